"""LAMP (Lee et al. 2021): layer-adaptive magnitude scores, comparable across layers.

Within each slot, indices sorted by squared norm get ``w_i^2 / sum_{j >= i} w_j^2``; the
score is scale-free, so global ranking across groups is meaningful."""
from __future__ import annotations

import numpy as np
import torch

from torchslim.criteria._base import rows, score_slots
from torchslim.graph import DependencyGraph, Group


def lamp_scores(squared: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(squared)
    sorted_sq = squared[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    scores = torch.empty_like(squared)
    scores[order] = sorted_sq / tail.clamp_min(1e-30)
    return scores


class LAMPImportance:
    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        return score_slots(graph, group, lambda name, dim, w: lamp_scores(rows(w, dim).pow(2).sum(1)))
