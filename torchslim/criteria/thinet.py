"""ThiNet (Luo et al., "ThiNet: A Filter Level Pruning Method for Deep Neural Network
Compression", ICCV 2017): channels ranked by how little their removal changes the *next*
layer's output on calibration data, chosen greedily.

For a consumer layer (a Linear, or an ungrouped Conv2d with its input unfolded into patches)
with weight ``W`` and input rows ``X``, removing the input channels ``S`` changes its output
by ``X_S W_S^T``, whose squared norm is ``sum_{i, j in S} G_ij (W^T W)_ij`` with ``G = X^T X``.
Summed over a channel's columns (its ``k x k`` patch entries) this is ``1^T A_SS 1`` for a
channel-by-channel matrix ``A`` accumulated over the batches, so memory is channels^2 per
consumer whatever the data. A group's channels may feed several consumers (a residual stream,
a concat): their ``A`` add up. ThiNet's greedy step then removes, one at a time, the channel
that increases the error least given those already removed (``A_cc + 2 sum_{s in S} A_cs``: a
channel whose input is small costs little however large its weights, and two channels carrying
the same signal cost more together than apart, which a per-channel norm cannot see); the removal
order is the ranking (removed first = lowest score), so every ratio takes a prefix of one greedy
run. Greedy, not exhaustive: a pair that cancels only when removed together is found only if
one of them is cheap alone.

Groups with no Linear / ungrouped Conv2d consumer (a depthwise conv, only the model's output)
fall back to the L2 norm of their weights, as ``l2``. Use with ``reconstruct_`` for ThiNet's
least-squares step.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from torchslim.criteria._base import iter_batches, owner
from torchslim.distributed import all_reduce_tensors_
from torchslim.criteria.norm import NormImportance
from torchslim.graph import DependencyGraph, Group

LOG = logging.getLogger(__name__)


def consumer_layers(graph: DependencyGraph) -> dict[str, nn.Module]:
    """Weight name -> layer for every Linear / ungrouped zero-padded Conv2d whose input
    channels (weight dim 1) belong to some prunable group."""
    layers: dict[str, nn.Module] = {}
    for group in graph.groups:
        for name, dim in group.params:
            if dim != 1 or not name.endswith("weight"):
                continue
            module = owner(graph.model, name)
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                                 and not isinstance(module.padding, str)
                                                 and module.padding_mode == "zeros"):
                layers[name] = module
    return layers


def channel_error_matrix(module: nn.Linear | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``A`` of one batch: ``A_cd = sum_{i in c, j in d} (X^T X)_ij (W^T W)_ij`` over the
    input channels c, d of ``module`` (float64)."""
    from torchslim.reconstruct.gram import input_rows

    rows = input_rows(module, x.detach()).double()
    weight = module.weight.detach().double()
    matrix = weight.reshape(weight.shape[0], -1)
    per_column = (rows.T @ rows) * (matrix.T @ matrix)
    channels = weight.shape[1]
    block = per_column.shape[0] // channels  # k*k entries per channel, channel-major
    return per_column.reshape(channels, block, channels, block).sum(dim=(1, 3))


def greedy_order(error: np.ndarray) -> np.ndarray:
    """Positions in the order ThiNet's greedy step removes them: each time the one whose
    removal adds least to ``1^T A_SS 1`` given the ones already removed."""
    n = error.shape[0]
    removed = np.zeros(n, dtype=bool)
    coupling = np.zeros(n, dtype=np.float64)  # sum over removed s of A[c, s]
    diagonal = np.diag(error).astype(np.float64)
    order = np.empty(n, dtype=np.int64)
    for step in range(n):
        added = np.where(removed, np.inf, diagonal + 2.0 * coupling)
        pick = int(np.argmin(added))
        order[step], removed[pick] = pick, True
        coupling += error[:, pick]
    return order


class ThiNetImportance:
    """ThiNet's greedy next-layer criterion (see the module docstring); needs ``data=``."""

    def __init__(self, max_batches: int | None = None):
        self.max_batches = max_batches
        self.matrices: dict[str, torch.Tensor] = {}
        self.fallback = NormImportance(2)

    @torch.no_grad()
    def prepare(self, graph: DependencyGraph, data: Iterable[Any], loss_fn: Callable | None = None) -> None:
        if data is None:
            raise ValueError("criterion 'thinet' needs data= (calibration batches) in prune_")
        from torchslim._inputs import call_model
        from torchslim.criteria.taylor import batch_inputs

        layers = consumer_layers(graph)
        self.matrices = {}

        def hook(name: str):
            def add(module: Any, args: tuple, output: Any) -> None:
                value = channel_error_matrix(module, args[0])
                self.matrices[name] = self.matrices[name] + value if name in self.matrices else value
            return add

        model = graph.model
        handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
        was_training = model.training
        model.eval()
        used = 0
        try:
            for batch in iter_batches(data, self.max_batches):
                call_model(model, batch_inputs(batch))
                used += 1
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if used == 0:
            raise ValueError("criterion 'thinet' got no calibration batch")
        names = sorted(self.matrices)  # under torchrun: every rank's batches, in one order on every rank
        all_reduce_tensors_([self.matrices[name] for name in names])

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        n = len(group)
        error = np.zeros((n, n), dtype=np.float64)
        found = False
        for name, dim in group.params:
            if dim != 1 or name not in self.matrices:
                continue
            labels = graph.param_labels(name, 1)
            position = np.searchsorted(group.atoms, labels)
            mine = (position < n) & (group.atoms[np.clip(position, 0, n - 1)] == labels)
            if not mine.any():
                continue
            found = True
            channels = np.flatnonzero(mine)
            atoms = position[channels]
            matrix = self.matrices[name].cpu().numpy()[np.ix_(channels, channels)]
            np.add.at(error, (atoms[:, None], atoms[None, :]), matrix)
        if not found:
            LOG.debug("thinet: group %d has no Linear/Conv2d consumer; ranked by the L2 norm", group.index)
            return self.fallback(graph, group)
        scores = np.empty(n, dtype=np.float64)
        scores[greedy_order(error)] = np.arange(n, dtype=np.float64)
        return scores
