"""torchslim: analyse, prune, physically slim, verify and export PyTorch models.

Front door::

    report = torchslim.analyze(model, example_inputs)
    result = torchslim.prune_(model, example_inputs, torchslim.PruneConfig(ratio=0.5))
    torchslim.verify(original, model, example_inputs, result.plan)
"""
from __future__ import annotations

__version__ = "0.1.0"

from torchslim.analysis import AnalysisReport, analyze

__all__ = ["AnalysisReport", "analyze", "__version__"]
