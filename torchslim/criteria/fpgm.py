"""FPGM (He et al. 2019): filters near the geometric median of their layer are replaceable
by the others, so they go first. A filter's score is its summed Euclidean distance to all
other filters of the same slot (the standard approximation of distance-to-median)."""
from __future__ import annotations

import numpy as np
import torch

from torchslim.criteria._base import rows, score_slots
from torchslim.graph import DependencyGraph, Group


class FPGMImportance:
    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        def distance_sum(name: str, dim: int, weight: torch.Tensor) -> torch.Tensor:
            matrix = rows(weight, dim)
            if matrix.shape[1] == 1:  # vectors (biases, norms) carry no filter geometry
                return torch.zeros(matrix.shape[0])
            return torch.cdist(matrix[None], matrix[None])[0].sum(1)

        return score_slots(graph, group, distance_sum)
