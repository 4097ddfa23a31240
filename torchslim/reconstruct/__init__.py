"""Accuracy without retraining: least-squares reconstruction of the layers that lost input
channels, from Gram matrices of their inputs on calibration data.

    original = copy.deepcopy(model)
    torchslim.prune_(model, x, torchslim.PruneConfig(target_macs=0.5))
    report = reconstruct_(model, original, calibration_batches)
"""
from torchslim.reconstruct.api import ReconstructionReport, reconstruct_
from torchslim.reconstruct.gram import GramCollector, collect_grams, input_rows
from torchslim.reconstruct.solve import RankDeficientWarning, Refit, refit

__all__ = ["GramCollector", "RankDeficientWarning", "ReconstructionReport", "Refit", "collect_grams", "input_rows",
           "reconstruct_", "refit"]
