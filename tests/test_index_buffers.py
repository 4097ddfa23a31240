"""Index buffers that permute channels (a channel shuffle's order): pruning slices them and
renumbers their values instead of pinning the channels they pick; the renumbered plan step
replays on a fresh model, rolls back bit for bit, and a tampered step is refused."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from _checkpoint_edits import rewrite_plan

import torchslim
from torchslim.graph import DependencyGraph
from torchslim.io import CheckpointError
from torchslim.pruning import applied, plan_removal

pytestmark = pytest.mark.usefixtures("one_thread")


class Shuffle(nn.Module):
    """``out[:, j] = x[:, order[j]]`` with the order in a buffer (persistent or not)."""

    def __init__(self, order: list[int], persistent: bool = True) -> None:
        super().__init__()
        self.register_buffer("order", torch.tensor(order), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.order)


class ShuffleNet(nn.Module):
    def __init__(self, order: list[int], persistent: bool = True, twice: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.shuffle = Shuffle(order, persistent)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.side = nn.Conv2d(3, 8, 1) if twice else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shuffle(torch.relu(self.bn(self.a(x))))
        if self.side is not None:  # the same buffer picks a second tensor's channels
            y = y * torch.sigmoid(self.side(x).index_select(1, self.shuffle.order))
        return self.b(y)


ORDER = [3, 1, 7, 0, 2, 6, 5, 4]


def _eval(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("twice", [False, True])
def test_pruning_through_a_shuffle_matches_the_zeroed_original_and_renumbers(persistent, twice):
    model = _eval(ShuffleNet(ORDER, persistent, twice))
    x = torch.randn(2, 3, 6, 6)
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    assert model.a.out_channels == 4 and model.b.in_channels == 4
    assert torchslim.verify(original, model, x, result.plan).ok
    removed_a = result.plan.removed["a.weight"][0]
    removed_entries = result.plan.removed["shuffle.order"][0]
    # entry j goes exactly when the channel it picks goes
    assert sorted(removed_entries) == sorted(j for j, v in enumerate(ORDER) if v in removed_a)
    kept = [v for v in ORDER if v not in removed_a]
    assert model.shuffle.order.tolist() == [sorted(kept).index(v) for v in kept]


def test_index_buffers_are_reported_and_constant_or_partial_indices_stay_pinned():
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph.build(_eval(ShuffleNet(ORDER)), x)
    assert list(graph.index_buffers) == ["shuffle.order"] and len(graph.groups) == 1
    partial = _eval(ShuffleNet([3, 1, 7, 0, 2, 6, 5, 5]))  # not a permutation: its picks stay fixed
    assert DependencyGraph.build(partial, x).groups == [] and not DependencyGraph.build(partial, x).index_buffers

    class Constant(nn.Module):  # the index is made in forward, not a buffer the engine can rewrite
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(self.a(x).index_select(1, torch.tensor(ORDER)))

    assert DependencyGraph.build(Constant(), x).groups == []


def test_applied_renumbers_and_rolls_back_bit_for_bit():
    model = _eval(ShuffleNet(ORDER))
    x = torch.randn(2, 3, 6, 6)
    graph = DependencyGraph.build(model, x)
    group = graph.groups[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_removal(graph, group.atoms[:3])
    assert set(plan.renumbered) == {"shuffle.order"} and "shuffle.order" not in plan.kept
    with applied(graph, plan):
        assert sorted(model.shuffle.order.tolist()) == list(range(5))
        assert model(x).shape == (2, 6, 6, 6)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_renumbered_step_replays_on_a_fresh_model_and_a_tampered_one_is_refused(tmp_path):
    model = _eval(ShuffleNet(ORDER, persistent=False))
    x = torch.randn(2, 3, 6, 6)
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.25))
    torchslim.save(model, tmp_path / "ck")
    loaded = torchslim.load(tmp_path / "ck", ShuffleNet(ORDER, persistent=False).eval())
    assert torch.equal(loaded.shuffle.order, model.shuffle.order) and torch.equal(loaded(x), model(x))

    def renumber_a_weight(data):
        data["steps"][-1]["renumbered"] = ["a.weight"]

    rewrite_plan(tmp_path / "ck", renumber_a_weight)
    fresh = ShuffleNet(ORDER, persistent=False)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"renumbered names 'a.weight'"):
        torchslim.load(tmp_path / "ck", fresh)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
    assert np.array_equal(fresh.shuffle.order.numpy(), ORDER)
