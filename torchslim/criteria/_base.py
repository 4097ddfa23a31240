"""What every criterion shares: the protocol and the slot-to-atom reduction.

Reduction (documented once for all criteria): a group's atoms live in parameter *slots*
``(param, dim)`` (a conv's output rows, its BatchNorm's vector, the next conv's input
columns). A criterion computes one value per index of a slot; an atom's score is the
sum of the values of every index it owns in every slot. Coupled layers therefore vote
together, and the engine only ever sees one score per atom (higher = keep).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from torchslim.graph import DependencyGraph, Group


@runtime_checkable
class Importance(Protocol):
    """Scores atoms. A criterion whose scores share one unit in every group (an estimated loss
    increase, as Fisher's) says so with a true ``comparable_across_groups`` attribute: global
    ranking then compares its scores as they are instead of dividing by each group's mean."""

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        """One score per atom of ``group`` (higher = keep)."""


def comparable_across_groups(importance: object) -> bool:
    """Whether ``importance``'s scores compare across groups as they are (see :class:`Importance`)."""
    return bool(getattr(importance, "comparable_across_groups", False))


class DataDriven(Protocol):
    """Criteria that measure the model on user batches first (Taylor, APoZ, mean activation)."""

    def prepare(self, graph: DependencyGraph, data: Iterable[Any], loss_fn: Callable | None) -> None: ...


def scatter_to_atoms(graph: DependencyGraph, group: Group, labels: np.ndarray, values: np.ndarray,
                     scores: np.ndarray) -> None:
    """Add per-element ``values`` (with atom ``labels``) into ``scores`` of the group's atoms."""
    position = np.clip(np.searchsorted(group.atoms, labels), 0, len(group.atoms) - 1)
    mine = group.atoms[position] == labels
    scores += np.bincount(position[mine], weights=values[mine], minlength=scores.size)


def parameter_slots(graph: DependencyGraph, group: Group) -> Iterable[tuple[str, int, torch.Tensor]]:
    """(name, dim, tensor) for every trainable parameter slot of the group (buffers excluded),
    the tensor detached in its own dtype (no copy)."""
    parameters = graph.parameters()
    for name, dim in group.params:
        if name in parameters:  # not a buffer
            yield name, dim, parameters[name].detach()


def rows(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight`` as a matrix with one row per index along ``dim``."""
    return weight.transpose(0, dim).reshape(weight.shape[dim], -1) if weight.ndim > 1 else weight.reshape(-1, 1)


def score_slots(graph: DependencyGraph, group: Group, per_index: Callable[[str, int, torch.Tensor], torch.Tensor],
                select: Callable[[str], bool] = lambda name: True, upcast: bool = True) -> np.ndarray:
    """Sum ``per_index(name, dim, weight)`` (one value per index of the slot) into atom scores.

    ``weight`` is a float32 copy of a lower-precision parameter when ``upcast`` (made only for
    the selected slots); ``upcast=False`` hands the parameter as it is, for criteria that cache
    per weight or do not read it, so that a large model's weights are not copied per slot."""
    scores = np.zeros(len(group), dtype=np.float64)
    for name, dim, weight in parameter_slots(graph, group):
        if select(name):
            values = per_index(name, dim, weight.float() if upcast else weight).detach().double().cpu().numpy()
            scatter_to_atoms(graph, group, graph.param_labels(name, dim), values, scores)
    return scores


def owner(model: nn.Module, param_name: str) -> nn.Module:
    module_name = param_name.rpartition(".")[0]
    return model.get_submodule(module_name) if module_name else model


def iter_batches(data: Iterable[Any], limit: int | None) -> Iterable[Any]:
    for i, batch in enumerate(data):
        if limit is not None and i >= limit:
            return
        yield batch
