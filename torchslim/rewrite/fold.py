"""Folding a grouped rewrite's channel shuffles into the neighbouring layers.

A ``GroupedConv2d`` reads its input channels in ``in_order`` and writes its outputs through
``out_order``. Where the channels on one side are exactly one dependency group, the engine can
reorder that group in every coupled tensor (producers, consumers, BatchNorm, residual adds)
without changing the function (``torchslim.pruning.permute_``); reordering it by the shuffle's
order leaves the shuffle as the identity, so it is dropped. A side that is not one free group
(the model's input or output, channels tied in blocks by a grouped conv, the conv's own other
side, a group another fold already reordered, or an order the engine refuses) keeps its
shuffle, with the reason in a :class:`SideFold`.

Every fold runs on the model as the previous ones left it: a permutation changes weight
values, never the traced structure, so the one graph stays valid, and each block's shuffles
are re-expressed in the new channel numbering after every permutation (so a later block whose
channels moved still reads and writes the right ones).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from torch import nn

from torchslim.graph import DependencyGraph, Group
from torchslim.graph.dependency import INPUT_PIN, OUTPUT_PIN
from torchslim.pruning import Transaction, permute_
from torchslim.pruning.verify import compare_runs, run_recorded, tolerances
from torchslim.rewrite.grouped import GroupedConv2d

SIDES = ("input", "output")
WEIGHT_DIM = {"input": 1, "output": 0}  # where a dense Conv2d's weight holds each side's channels


@dataclasses.dataclass(frozen=True)
class SideFold:
    """One side of a grouped block: whether its permutation was folded into the neighbouring
    layers (no ``ChannelShuffle`` there) and why, or why not (the shuffle is kept)."""

    folded: bool
    reason: str

    def __str__(self) -> str:
        return f"folded ({self.reason})" if self.folded else f"shuffle kept: {self.reason}"


@dataclasses.dataclass
class Folding:
    """What :func:`fold_shuffles_` did: each block's decision per side (``"input"``,
    ``"output"``), and the permutations applied to the model, undone by :meth:`undo`."""

    sides: dict[str, dict[str, SideFold]]
    transaction: Transaction

    def undo(self) -> None:
        """Put the model's weights back in their order before the folds (the blocks keep theirs)."""
        self.transaction.rollback()


@dataclasses.dataclass
class _Orders:
    """A block's shuffles in the model's current channel numbering: it reads input channel
    ``inp[j]`` as its j-th, and its output channel j is its conv's output ``out[j]``."""

    inp: np.ndarray
    out: np.ndarray


def fold_shuffles_(model: nn.Module, example_inputs: Any, blocks: Mapping[str, GroupedConv2d]) -> Folding:
    """Fold the shuffles of ``blocks`` (fitted for the dense convs of ``model`` at those names,
    not yet in it) into their neighbours where possible: permute the model's groups in place
    and set each block's remaining shuffles, block by block in the order given.

    The outputs on ``example_inputs`` are compared before and after the permutations; if they
    differ, the permutations are undone and every shuffle is kept (the reason says by how much).
    """
    graph = DependencyGraph.build(model, example_inputs)
    orders = {name: _orders_of(block) for name, block in blocks.items()}
    reference = run_recorded(model, example_inputs)
    tx = Transaction()
    try:
        sides = _fold_all(graph, orders, tx)
        problem = _changed_outputs(model, example_inputs, reference) if _any_folded(sides) else None
    except Exception:
        tx.rollback()
        raise
    if problem is not None:
        tx.rollback()
        tx = Transaction()
        orders = {name: _orders_of(block) for name, block in blocks.items()}
        sides = {name: {side: SideFold(False, problem) for side in SIDES} for name in blocks}
    for name, block in blocks.items():
        block.set_orders(orders[name].inp.tolist(), orders[name].out.tolist())
    return Folding(sides, tx)


def _orders_of(block: GroupedConv2d) -> _Orders:
    conv = block.conv
    inp, out = block.in_order, block.out_order
    return _Orders(np.arange(conv.in_channels) if inp is None else np.asarray(inp, dtype=np.int64),
                   np.arange(conv.out_channels) if out is None else np.asarray(out, dtype=np.int64))


def _any_folded(sides: dict[str, dict[str, SideFold]]) -> bool:
    return any(f.folded for by_side in sides.values() for f in by_side.values())


def _fold_all(graph: DependencyGraph, orders: dict[str, _Orders], tx: Transaction) -> dict[str, dict[str, SideFold]]:
    """Each block's sides in turn: fold where :func:`_foldable` allows, renumbering every
    block's orders after each permutation; a group is reordered at most once."""
    claimed: dict[int, str] = {}  # group index -> the side folded into it
    sides: dict[str, dict[str, SideFold]] = {}
    for name in orders:
        sides[name] = {}
        for side in SIDES:
            group, why_not = _foldable(graph, name, side, claimed)
            if group is None:
                sides[name][side] = SideFold(False, why_not)
                continue
            labels = graph.param_labels(f"{name}.weight", WEIGHT_DIM[side])
            wanted = orders[name].inp if side == "input" else np.argsort(orders[name].out)
            try:
                indices = permute_(graph, {group.index: group_order(group, labels, wanted)}, tx)
            except ValueError as exc:  # checked before any tensor changes: nothing to undo
                sides[name][side] = SideFold(False, f"the engine refuses to reorder group {group.index}: {exc}")
                continue
            _renumber(orders, indices)
            claimed[group.index] = f"'{name}' ({side})"
            sides[name][side] = SideFold(True, f"dependency group {group.index} reordered")
    return sides


def group_order(group: Group, labels: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The order for ``DependencyGraph.permutation`` that moves channel ``wanted[c]`` of a
    tensor dim whose channels are the atoms ``labels`` (one each) into place c."""
    atoms = np.asarray(group.atoms)
    by_atom = np.argsort(atoms)
    position = by_atom[np.searchsorted(atoms[by_atom], labels)]
    order = atoms.copy()
    order[position] = labels[wanted]
    return order


def _renumber(orders: dict[str, _Orders], indices: dict[str, dict[int, np.ndarray]]) -> None:
    """Re-express every block's orders after ``new = old.index_select(dim, index)`` moved its
    conv's channels: input channel k is now ``argsort(index)[k]``; output j takes ``out[index[j]]``."""
    for name, o in orders.items():
        moved = indices.get(f"{name}.weight", {})
        if 1 in moved:
            o.inp = np.argsort(moved[1])[o.inp]
        if 0 in moved:
            o.out = o.out[moved[0]]


def _foldable(graph: DependencyGraph, name: str, side: str, claimed: dict[int, str]) -> tuple[Group | None, str]:
    """The group to reorder for one side of the conv ``name``, or None and why it cannot be."""
    labels = graph.param_labels(f"{name}.weight", WEIGHT_DIM[side])
    in_group = graph.atom_group[labels]
    if (in_group < 0).any():
        return None, _pinned_reason(graph, labels[in_group < 0], side)
    if np.unique(labels).size != labels.size:
        return None, (f"its {side} channels are tied in blocks (a grouped convolution shares them), so they "
                      "cannot be reordered one by one")
    if np.unique(in_group).size > 1:
        return None, f"its {side} channels span {np.unique(in_group).size} dependency groups (e.g. a concatenation)"
    group = graph.groups[int(in_group[0])]
    if len(group) != labels.size:
        return None, f"its {side} channels are part of a wider dependency group ({len(group)} channels)"
    other = graph.param_labels(f"{name}.weight", 1 - WEIGHT_DIM[side])
    if np.isin(other, group.atoms).any():
        return None, "its input and output channels are one dependency group (e.g. a residual connection around it)"
    if group.index in claimed:
        return None, f"its dependency group {group.index} was already reordered to fold {claimed[group.index]}"
    return group, ""


def _pinned_reason(graph: DependencyGraph, atoms: np.ndarray, side: str) -> str:
    """Why some of a side's channels are in no prunable group: the model's input/output or an op."""
    for pin, what in ((INPUT_PIN, "input"), (OUTPUT_PIN, "output")):
        if np.isin(atoms, graph.labels[graph.coupling.held_by((pin,))]).any():
            return f"its {side} channels are the model's {what}"
    blockers = graph.explain(atoms, limit=1)
    if blockers:
        return f"its {side} channels are pinned by {blockers[0]}"
    return f"its {side} channels are pinned (in no prunable dependency group)"


def _changed_outputs(model: nn.Module, example_inputs: Any, reference: Any) -> str | None:
    """None when the model still computes ``reference``'s outputs, else a reason saying by how much."""
    actual = run_recorded(model, example_inputs)
    atol, rtol = tolerances([*reference.outputs, *model.parameters()])
    report = compare_runs(reference, actual, atol, rtol)
    if report.ok:
        return None
    return f"folding changed the outputs ({report.message}), so it was undone"
