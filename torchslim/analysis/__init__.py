"""Model analysis: per-layer params, MACs, activation memory and measured latency.

``analyze(model, example_inputs)`` returns an :class:`AnalysisReport`; the MACs convention is
documented in :mod:`torchslim.analysis._macs`.
"""
from torchslim.analysis._macs import CUSTOM_MAPPING, MacProfile, fastpath_disabled, profile_macs
from torchslim.analysis.analyze import analyze
from torchslim.analysis.report import AnalysisReport, LayerRow, RollupRow

__all__ = ["AnalysisReport", "CUSTOM_MAPPING", "LayerRow", "MacProfile", "RollupRow", "analyze", "fastpath_disabled", "profile_macs"]
