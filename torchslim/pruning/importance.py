"""Importance criteria: each scores every atom of a group over all its coupled layers.

Reduction: for every parameter slot ``(param, dim)`` of the group, each index gets the
norm of its slice (all other dims), and an atom's score is the sum over all slots and
indices it owns. Coupled layers (a conv, its BatchNorm, the next conv's input columns)
therefore vote together. The engine only sees the returned scores, so any criterion
plugs in.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


from torchslim.graph import DependencyGraph, Group


class Importance(Protocol):
    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        """Return one score per atom of ``group`` (higher = keep)."""


def scatter_to_atoms(graph: DependencyGraph, group: Group, name: str, dim: int, values: np.ndarray,
                     scores: np.ndarray) -> None:
    """Add per-index ``values`` of slot ``(name, dim)`` into the scores of the atoms owning them."""
    labels = graph.param_labels(name, dim)
    position = np.searchsorted(group.atoms, labels)
    position = np.clip(position, 0, len(group.atoms) - 1)
    mine = group.atoms[position] == labels
    np.add.at(scores, position[mine], values[mine])


def _parameters(graph: DependencyGraph) -> dict[str, torch.Tensor]:
    return dict(graph.model.named_parameters())


class NormImportance:
    """Sum over coupled slots of the Lp norm of each slice (p=1: L1 filter norm, p=2: L2)."""

    def __init__(self, p: int = 1):
        self.p = p

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        params = _parameters(graph)
        scores = np.zeros(len(group), dtype=np.float64)
        for name, dim in group.params:
            if name not in params:  # buffers (running stats) do not vote
                continue
            weight = params[name].detach().float()
            if weight.ndim == 1:
                per_index = weight.abs().pow(self.p)
            else:
                per_index = weight.transpose(0, dim).reshape(weight.shape[dim], -1).abs().pow(self.p).sum(1)
            scatter_to_atoms(graph, group, name, dim, per_index.cpu().numpy().astype(np.float64), scores)
        return scores ** (1.0 / self.p)


class RandomImportance:
    """Seeded random scores: a baseline, and a way to test the engine on arbitrary choices."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        return self.rng.random(len(group))


CRITERIA = {
    "l1": lambda seed: NormImportance(1),
    "l2": lambda seed: NormImportance(2),
    "random": lambda seed: RandomImportance(seed),
}


def make_importance(criterion: object, seed: int = 0) -> Importance:
    if isinstance(criterion, str):
        return CRITERIA[criterion](seed)
    if callable(criterion):
        return criterion  # type: ignore[return-value]
    raise ValueError(f"PruneConfig.criterion must be a name or a callable, got {type(criterion).__name__}")


