"""Model analysis: per-layer params, MACs, activation memory and measured latency.

``analyze(model, example_inputs)`` returns an :class:`AnalysisReport`; the MACs convention is
documented in :mod:`torchslim.graph.macs`.
"""
from torchslim.analysis._profile import MacProfile, profile_macs
from torchslim.graph import CUSTOM_MAPPING
from torchslim.graph.macs import fastpath_disabled
from torchslim.analysis.analyze import analyze
from torchslim.analysis.report import AnalysisReport, LayerRow, RollupRow

__all__ = ["AnalysisReport", "CUSTOM_MAPPING", "LayerRow", "MacProfile", "RollupRow", "analyze", "fastpath_disabled", "profile_macs"]
