"""Reordering channels in every coupled tensor leaves the function unchanged, over the whole
architecture zoo; sorting by importance puts the best channels first, so that removing each
group's last atoms is removing its least important ones; ill-posed orders are refused with the
model untouched."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.archs import ARCHS, assert_outputs_close, flat_outputs, run  # noqa: E402

import torchslim  # noqa: E402
from torchslim.graph import DependencyGraph  # noqa: E402
from torchslim.pruning import Transaction, applied, channel_order, permute_, sort_channels_  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [pytest.param(n, marks=pytest.mark.slow) if ARCHS[n].slow else n for n in sorted(ARCHS)]


def random_orders(graph: DependencyGraph, seed: int = 0) -> dict[int, np.ndarray]:
    """Every group's atoms shuffled within each class of atoms that can trade places."""
    rng = np.random.default_rng(seed)
    orders = {}
    for group in graph.groups:
        order = np.array(group.atoms)
        for members in graph.interchangeable(group):
            order[np.isin(group.atoms, members)] = rng.permutation(members)
        orders[group.index] = order
    return orders


@pytest.mark.parametrize("name", NAMES)
def test_a_random_permutation_of_every_group_keeps_the_outputs_and_rolls_back(name):
    model, inputs = ARCHS[name]()
    expected = [t.clone() for t in flat_outputs(run(model, inputs))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = DependencyGraph.build(model, inputs)
    tx = Transaction()
    indices = permute_(graph, random_orders(graph), tx)
    movable = any(len(c) > 1 for g in graph.groups for c in graph.interchangeable(g))
    assert bool(indices) == movable
    if movable:  # the weights really moved
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_outputs_close(expected, flat_outputs(run(model, inputs)))
    tx.rollback()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sorted_channels_put_the_most_important_first_and_the_last_atoms_are_the_least():
    model, x = ARCHS["residual_add"]()
    original = copy.deepcopy(model)
    result = sort_channels_(model, x, "l1")
    assert result.orders and result.max_abs_error < 1e-4
    graph = DependencyGraph.build(model, x)
    reference = DependencyGraph.build(original, x)
    for group, ref_group in zip(graph.groups, reference.groups, strict=True):
        scores = torchslim.criteria.make_importance("l1", 0)(graph, group)
        for members in graph.interchangeable(group):
            ranked = np.asarray(scores)[np.isin(group.atoms, members)]
            assert np.all(np.diff(ranked) <= 1e-6), f"group {group.index} not sorted: {ranked}"
        # removing the sorted model's last k atoms = removing the original's k least important
        k = len(group) // 2
        with applied(graph, group.atoms[len(group) - k:]), applied(reference, channel_order(reference, ref_group)[:k]):
            assert_outputs_close(flat_outputs(run(original, x)), flat_outputs(run(model, x)))


def test_atoms_that_cannot_trade_places_or_a_non_permutation_are_refused_untouched():
    model, x = ARCHS["concat_channels"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = DependencyGraph.build(model, x)
    group = next(g for g in graph.groups if len(graph.interchangeable(g)) > 1)
    first, second = graph.interchangeable(group)[:2]
    order = np.array(group.atoms)
    i, j = np.flatnonzero(group.atoms == first[0])[0], np.flatnonzero(group.atoms == second[0])[0]
    order[[i, j]] = order[[j, i]]  # one atom of each producer swapped
    with pytest.raises(ValueError, match=r"cannot trade places: .* in dim 0 of the param '"):
        permute_(graph, {group.index: order}, Transaction())
    with pytest.raises(ValueError, match="must be a permutation of its"):
        permute_(graph, {group.index: np.repeat(group.atoms[:1], len(group))}, Transaction())
    with pytest.raises(ValueError, match="no group 99"):
        permute_(graph, {99: group.atoms}, Transaction())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_permuting_through_a_channel_shuffle_keeps_its_index_buffer():
    from test_index_buffers import ORDER, ShuffleNet, _eval

    model = _eval(ShuffleNet(ORDER, twice=True))
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    graph = DependencyGraph.build(model, x)
    indices = permute_(graph, random_orders(graph, seed=3), Transaction())
    assert "shuffle.order" not in indices and model.shuffle.order.tolist() == ORDER
    assert "a.weight" in indices
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
