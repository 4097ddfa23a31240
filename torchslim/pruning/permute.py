"""Reordering channels without changing the function: the engine's permutation of coupled tensors.

Pruning removes a group's atoms from every tensor that holds them; permuting moves them, in
every such tensor alike, so the model computes the same outputs with its channels in a new
order. Slimmable networks need it (sorted most important first, "the first k channels" are the
best k at every width), and so does folding a channel shuffle into the layer before it.

* :func:`permute_` reorders the atoms of some groups inside a :class:`Transaction`;
* :func:`sort_channels_` sorts every prunable group by a criterion and checks the outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.graph import DependencyGraph, Group
from torchslim.pruning._surgery import Transaction, named_tensors, slice_to_kept
from torchslim.pruning.apply import channel_order
from torchslim.pruning.verify import compare_runs, run_recorded, tolerances


@dataclasses.dataclass
class ChannelSort:
    """What :func:`sort_channels_` did: the graph (still valid for the sorted model), the atom
    order given to each group (most important first) and the largest output difference."""

    graph: DependencyGraph
    orders: dict[int, np.ndarray]
    max_abs_error: float


def permute_(graph: DependencyGraph, orders: Mapping[int, Sequence[int] | np.ndarray],
             tx: Transaction) -> dict[str, dict[int, np.ndarray]]:
    """Reorder the atoms of the groups in ``orders`` (see ``DependencyGraph.permutation``) in
    every parameter and buffer of ``graph.model``, in place inside ``tx`` (gradients alike; the
    same tensor objects). Returns the index applied per tensor and dim. An optimizer's state
    is not reordered: permute before building it."""
    indices = graph.permutation(orders)
    tensors = named_tensors(graph.model)
    for name, dims in indices.items():
        slice_to_kept(tensors[name], dims, tx)
    return indices


def sorted_order(graph: DependencyGraph, group: Group, criterion: Any = "l1") -> np.ndarray:
    """An order for ``DependencyGraph.permutation``: within each class of atoms that can trade
    places (``DependencyGraph.interchangeable``), the most important first, in the places that
    class holds in ``group.atoms`` (a concat group sorts each producer's channels apart)."""
    ranked = channel_order(graph, group, criterion)[::-1]  # most important first
    order = np.array(group.atoms, dtype=np.int64)
    place = {int(atom): i for i, atom in enumerate(group.atoms)}
    for members in graph.interchangeable(group):
        keep = np.isin(ranked, members)
        order[[place[int(a)] for a in members]] = ranked[keep]
    return order


def sort_channels_(model: nn.Module, example_inputs: ExampleInputs, criterion: Any = "l1", *,
                   filter_fn: Callable[[DependencyGraph, Group], bool] | None = None,
                   atol: float | None = None, rtol: float | None = None) -> ChannelSort:
    """Sort the channels of every prunable group most important first under ``criterion`` (a
    name in ``torchslim.criteria.CRITERIA`` or a callable ``(graph, group) -> scores``), in every
    coupled tensor, in place (see :func:`sorted_order`). The outputs on ``example_inputs`` are compared before and after;
    if they differ beyond tolerance the model is restored and ``ValueError`` says by how much.
    ``filter_fn(graph, group)`` keeps a group in its order when it returns False."""
    graph = DependencyGraph.build(model, example_inputs)
    orders = {g.index: sorted_order(graph, g, criterion) for g in graph.groups if filter_fn is None or filter_fn(graph, g)}
    orders = {g: order for g, order in orders.items() if not np.array_equal(order, graph.groups[g].atoms)}
    reference = run_recorded(model, example_inputs)
    tx = Transaction()
    try:
        permute_(graph, orders, tx)
        actual = run_recorded(model, example_inputs)
    except Exception:
        tx.rollback()
        raise
    atol, rtol = tolerances([*reference.outputs, *model.parameters()], atol, rtol)
    report = compare_runs(reference, actual, atol, rtol)
    if not report.ok:
        tx.rollback()
        raise ValueError(f"sorting the channels changed the outputs ({report.message}); the model is restored")
    return ChannelSort(graph, orders, report.max_abs_error)
