"""Per-layer hidden-state distillation: the default mapping is every block of the outermost
ModuleLists; the loss is the mean relative squared error of mapped outputs, compared on the
channels a pruned block kept (zero against the zeroed original); a few steps shrink it; bad
mappings and a missing forward are refused by name."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim
from torchslim.pruning import zero_removed_
from torchslim.recovery import LayerDistiller
from torchslim.recovery.layers import block_names

pytestmark = pytest.mark.usefixtures("one_thread")


class Blocks(nn.Module):
    """A stem, then blocks in a ModuleList (one holding a nested ModuleList), then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU()),
                                     nn.Sequential(nn.Conv2d(12, 10, 3, padding=1), nn.ReLU())])
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def test_default_mapping_is_every_block_of_the_outermost_lists():
    model = Blocks()
    assert block_names(model) == ["blocks.0", "blocks.1"]
    model.blocks[0].append(nn.ModuleList([nn.Identity()]))  # a nested list is not a block list
    assert block_names(model) == ["blocks.0", "blocks.1"]


def test_loss_is_the_mean_relative_error_of_the_mapped_outputs():
    teacher = Blocks().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.blocks[1][0].weight.mul_(1.5)
    x = torch.randn(2, 3, 8, 8)
    with LayerDistiller(student, teacher) as layers:
        student(x)
        teacher(x)
        loss = layers.loss()
    with torch.no_grad():
        t0, t1 = teacher.blocks[0](teacher.stem(x)), None
        t1 = teacher.blocks[1](t0)
        s1 = student.blocks[1](t0)
    expected = 0.5 * ((s1 - t1).pow(2).sum() / t1.pow(2).sum())  # block 0 is identical
    torch.testing.assert_close(loss, expected)


def test_a_pruned_block_is_compared_on_its_kept_channels_exactly():
    teacher = Blocks().eval()
    x = torch.randn(2, 3, 8, 8)
    student = copy.deepcopy(teacher)
    result = torchslim.prune_(student, x, torchslim.PruneConfig(ratio=0.5))
    assert student.blocks[0][0].out_channels < 12
    zeroed = copy.deepcopy(teacher)
    zero_removed_(zeroed, result.plan.removed)  # the pruned model computes the zeroed original on kept channels
    with LayerDistiller(student, zeroed) as layers, torch.no_grad():
        student(x)
        zeroed(x)
        assert float(layers.loss()) < 1e-10
    with LayerDistiller(student, teacher) as layers, torch.no_grad():
        student(x)
        teacher(x)
        assert float(layers.loss()) > 1e-3  # against the unpruned teacher there is a gap to close


def test_a_few_steps_shrink_the_hidden_state_gap():
    teacher = Blocks().eval()
    x = torch.randn(16, 3, 8, 8)
    student = copy.deepcopy(teacher)
    torchslim.prune_(student, x[:1], torchslim.PruneConfig(ratio=0.5))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    gaps = []
    with LayerDistiller(student, teacher) as layers:
        for _ in range(30):
            student(x)
            with torch.no_grad():
                teacher(x)
            loss = layers.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            gaps.append(float(loss))
    assert gaps[-1] < 0.5 * gaps[0]


def test_bad_mappings_and_a_missing_forward_are_refused():
    teacher, student = Blocks(), Blocks()
    with pytest.raises(ValueError, match=r"'blocks\.7' is not a module of the student"):
        LayerDistiller(student, teacher, ["blocks.7"])
    with pytest.raises(ValueError, match="'nope' is not a module of the teacher"):
        LayerDistiller(student, teacher, {"blocks.0": "nope"})
    with pytest.raises(ValueError, match=r"no nn\.ModuleList"):
        LayerDistiller(nn.Linear(2, 2), nn.Linear(2, 2))
    with LayerDistiller(student, teacher) as layers:
        student(torch.randn(1, 3, 8, 8))
        with pytest.raises(RuntimeError, match="did not run in both"):
            layers.loss()
