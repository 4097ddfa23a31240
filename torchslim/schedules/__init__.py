"""Schedules: one-shot (``prune_``), iterative with fine-tuning between steps, and AGP."""
from torchslim.schedules.agp import AGPPruner, agp_sparsity
from torchslim.schedules.iterative import IterativeResult, prune_iteratively, step_configs

__all__ = ["AGPPruner", "IterativeResult", "agp_sparsity", "prune_iteratively", "step_configs"]
