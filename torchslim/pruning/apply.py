"""The engine API for evaluating candidate removals: plan, apply, roll back, order channels.

A search (NetAdapt-style latency loops, AMC, slimmable widths) evaluates many removals on
one traced :class:`~torchslim.graph.DependencyGraph`. Each removal is a set of atoms (the
graph's unit of removal; a group's ``atoms``):

* :func:`plan_removal` computes, before any tensor is touched, what the removal does: per
  parameter/buffer the kept indices of each shrinking dim and the new shape, per module
  the attribute values that change;
* :func:`applied` applies it as a context and rolls it back on exit, leaving the model
  bit-identical (same Parameter objects, same data, same attributes);
* :func:`channel_order` ranks a group's atoms under a criterion, least important first.

Example::

    graph = DependencyGraph.build(model, x)
    group = graph.groups[0]
    order = channel_order(graph, group, "l1")
    for k in (8, 16, 32):
        with applied(graph, order[:k]):
            print(k, evaluate(model))
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from torchslim.criteria import make_importance
from torchslim.graph import DependencyGraph, Group, OpCall
from torchslim.pruning._surgery import (Transaction, kept_indices, named_tensors, planned_attributes,
                                        renumbered_index, renumbered_indices, set_renumbered, slice_to_kept)

__all__ = ["RemovalPlan", "applied", "apply_plan", "channel_order", "plan_removal", "renumbered_index"]


@dataclasses.dataclass
class RemovalPlan:
    """A removal as data: what :func:`apply_plan` will change, computed without touching the model.

    ``kept``: parameter/buffer name -> dim -> indices kept (of the current shape), only for
    tensors that shrink; ``shapes``: their new shapes; ``attributes``: module name ->
    attribute -> new value; ``unresolved``: traced ops whose literal sizes change but match no
    module attribute (suspects if the removal breaks the model); ``renumbered``: the new
    values of index buffers (see ``DependencyGraph.index_buffers``), already sliced;
    ``dropped``: ``nn.ModuleList`` path -> entries removed (whole expert modules), applied
    first, so that the other names refer to the model after them.
    """

    removed_atoms: np.ndarray
    kept: dict[str, dict[int, np.ndarray]]
    shapes: dict[str, tuple[int, ...]]
    attributes: dict[str, dict[str, Any]]
    unresolved: list[OpCall] = dataclasses.field(default_factory=list)
    renumbered: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    dropped: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def plan_removal(graph: DependencyGraph, removed_atoms: np.ndarray) -> RemovalPlan:
    """Plan removing ``removed_atoms`` from ``graph.model`` (the model is not modified)."""
    atoms = np.unique(np.asarray(removed_atoms, dtype=np.int64))
    kept = kept_indices(graph, atoms)
    tensors = named_tensors(graph.model)
    shapes = {}
    for name, dims in kept.items():
        shape = list(tensors[name].shape)
        for dim, keep in dims.items():
            shape[dim] = len(keep)
        shapes[name] = tuple(shape)
    attributes, unresolved = planned_attributes(graph, atoms, kept)
    return RemovalPlan(atoms, kept, shapes, attributes, unresolved, renumbered_indices(graph, atoms))


def apply_plan(model: nn.Module, plan: RemovalPlan, tx: Transaction) -> None:
    """Slice every planned tensor of ``model`` in place and set the planned attributes, inside
    ``tx`` (``tx.rollback()`` undoes it all, bit for bit; :func:`applied` does both)."""
    for path, gone in plan.dropped.items():  # whole entries first (per-expert modules), renumbered in place
        tx.drop_entries(model.get_submodule(path), {int(i) for i in np.asarray(gone, dtype=np.int64).reshape(-1)})
    tensors = named_tensors(model)
    for name, dims in plan.kept.items():
        slice_to_kept(tensors[name], dims, tx)
    set_renumbered(model, plan.renumbered, tx)
    for label, attrs in plan.attributes.items():
        module = model.get_submodule(label) if label else model
        for attr, value in attrs.items():
            tx.setattr(module, attr, value, label)


@contextlib.contextmanager
def applied(graph: DependencyGraph, removed_atoms: np.ndarray | RemovalPlan) -> Iterator[RemovalPlan]:
    """Apply a removal (atoms or a :class:`RemovalPlan`) for the duration of a ``with`` block.

    On exit, normal or by exception, the model is restored bit-identically: the same
    Parameter and buffer objects with their original data and gradients, the same module
    attributes. The planned removal is yielded. A sliced tensor gets its old gradient back
    (one computed inside is dropped); a tensor the removal does not slice is never touched.
    """
    plan = removed_atoms if isinstance(removed_atoms, RemovalPlan) else plan_removal(graph, removed_atoms)
    tx = Transaction()
    try:
        apply_plan(graph.model, plan, tx)
        yield plan
    finally:
        tx.rollback()


def channel_order(graph: DependencyGraph, group: Group, criterion: Any = "l1", seed: int = 0) -> np.ndarray:
    """The group's atoms sorted least important first under ``criterion`` (a name in
    ``torchslim.criteria.CRITERIA`` or a callable ``(graph, group) -> scores``; ties keep
    the atom order). Data-driven criteria need ``prepare`` first: pass such an object
    already prepared."""
    importance = make_importance(criterion, seed)
    scores = np.asarray(importance(graph, group), dtype=np.float64)
    if scores.shape != (len(group.atoms),):
        raise ValueError(f"criterion {criterion!r} gave {scores.shape} scores for group {group.index} "
                         f"with {len(group.atoms)} atoms")
    return np.asarray(group.atoms)[np.argsort(scores, kind="stable")]
