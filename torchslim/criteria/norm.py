"""L1 / L2 filter norms (Li et al. 2017): small weights contribute little."""
from __future__ import annotations

import numpy as np

from torchslim.criteria._base import rows, score_slots
from torchslim.graph import DependencyGraph, Group


class NormImportance:
    """Lp norm of each atom over all its coupled slices: (sum_slots sum |w|^p)^(1/p)."""

    def __init__(self, p: int = 1):
        self.p = p

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        scores = score_slots(graph, group, lambda name, dim, w: rows(w, dim).abs().pow(self.p).sum(1))
        return scores ** (1.0 / self.p)
