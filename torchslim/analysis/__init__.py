"""Model analysis: per-layer params, MACs, activation memory and measured latency."""
from torchslim.analysis.analyze import analyze
from torchslim.analysis.report import AnalysisReport, LayerRow

__all__ = ["AnalysisReport", "LayerRow", "analyze"]
