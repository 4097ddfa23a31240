"""L1 / L2 filter norms (Li et al. 2017): small weights contribute little."""
from __future__ import annotations

import math

import numpy as np
import torch

from torchslim.criteria._base import score_slots
from torchslim.graph import DependencyGraph, Group


class NormImportance:
    """Lp norm of each atom over all its coupled slices: (sum_slots sum |w|^p)^(1/p)."""

    def __init__(self, p: int = 1):
        self.p = p
        self._sums: dict[tuple[str, int], tuple[tuple[int, int], torch.Tensor]] = {}
        self._graph_id: int | None = None
        self._scratch = torch.empty(0)

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        if self._graph_id != id(graph):
            self._graph_id, self._sums = id(graph), {}
        scores = score_slots(graph, group, lambda name, dim, w: self._slot_sums(graph, name, dim, w))
        return scores ** (1.0 / self.p)

    def _slot_sums(self, graph: DependencyGraph, name: str, dim: int, weight: torch.Tensor) -> torch.Tensor:
        """|w|^p summed per index of ``dim``. A weight is usually a slot of two groups (a conv's
        output rows and its input columns): |w|^p is computed once and summed for every slot dim
        of the graph, and reused while the weight is unchanged (same storage and version)."""
        stamp = (weight.data_ptr(), weight._version)
        cached = self._sums.get((name, dim))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        powered = self._powered(weight)
        for d in graph.slot_dims(name) | {dim}:
            self._sums[(name, d)] = (stamp, _sum_except(powered, d))
        return self._sums[(name, dim)][1]

    def _powered(self, weight: torch.Tensor) -> torch.Tensor:
        """|w|^p in a reused buffer: a fresh multi-megabyte tensor per weight costs more in page
        faults than the arithmetic (ResNet-50's 3x3 convs: 1.7 ms vs 0.17 ms per abs)."""
        if self._scratch.numel() < weight.numel() or self._scratch.dtype != weight.dtype \
                or self._scratch.device != weight.device:
            self._scratch = torch.empty(weight.numel(), dtype=weight.dtype, device=weight.device)
        powered = torch.abs(weight, out=self._scratch[: weight.numel()].view(weight.shape))
        return powered if self.p == 1 else powered.pow_(self.p)


def _sum_except(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dim but ``dim`` (a new tensor): the leading dims first, as column sums
    over contiguous rows, then the trailing ones. torch's reduction over (0, 2, 3) of a conv
    weight at once is strided and several times slower."""
    lead = math.prod(tensor.shape[:dim])
    flat = tensor.reshape(lead, -1).sum(0) if lead > 1 else tensor.reshape(-1)
    return flat.reshape(tensor.shape[dim], -1).sum(1)
