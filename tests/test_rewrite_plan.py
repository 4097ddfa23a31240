"""The budget planner and bad input: layers with the least fit error per MAC saved go first,
the plan can be read before it is applied, and every bad request raises a ValueError naming the
module at fault with the model (modules, weights, pruning history) left untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim
from torchslim.rewrite import RewriteConfig, plan_rewrite, rewrite_


pytestmark = pytest.mark.usefixtures("one_thread")


class Scale(nn.Module):
    """A custom layer with a weight: no rewrite knows it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c, c))

    def forward(self, x):
        return x @ self.weight


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.point = nn.Conv2d(8, 6, 1)
        self.custom = Scale(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.point(self.dw(torch.relu(self.reflect(torch.relu(self.conv(x))))))
        return self.fc(self.custom(x.mean((2, 3))))


def mixed() -> Mixed:
    torch.manual_seed(0)
    return Mixed().eval()


def x4() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("config, message", [
    (RewriteConfig(to="lowrank", modules=["conv"], setting=40), r"'conv' as lowrank: rank=40 is outside 1\.\.8"),
    (RewriteConfig(to="lowrank", modules=["fc"], setting=0), r"'fc' as lowrank: rank=0 is outside 1\.\.5"),
    (RewriteConfig(to="separable", modules=["conv"], setting=10), r"'conv' as separable: multiplier=10 is outside 1\.\.8"),
    (RewriteConfig(to="grouped", modules=["conv"], setting=3), r"'conv' as grouped: groups=3 does not divide its 4 input and 8"),
    (RewriteConfig(to="grouped", modules=["conv"], setting=8), r"'conv' as grouped: groups=8 is outside 1\.\.4"),
    (RewriteConfig(to="separable", modules=["reflect"], setting=1), r"'reflect' as separable: padding_mode='reflect' cannot be kept"),
    (RewriteConfig(to="lowrank", modules=["dw"], setting=1), r"'dw' as lowrank: it is a grouped convolution \(groups=8\)"),
    (RewriteConfig(to="lowrank", modules=["custom"], setting=1), r"'custom' as lowrank: it is a Scale, not an nn.Linear or nn.Conv2d"),
    (RewriteConfig(to="separable", modules=["point"], setting=1), r"'point' as separable: it is a 1x1 convolution"),
    (RewriteConfig(to="dilated", modules=["conv"]), r"'conv' as dilated: its kernel 3x3 .* is not a square odd kernel of 5x5"),
    (RewriteConfig(to="lowrank", modules=["nope"], setting=1), r"Mixed has no module 'nope'"),
    (RewriteConfig(to="lowrank", modules=["cust*"], setting=1), r"no module matching 'cust\*' can be rewritten as lowrank"),
    (RewriteConfig(to="lowrank", setting=2, target_macs=0.5), r"exactly one of setting= \(the rank\) and target_macs="),
    (RewriteConfig(to="lowrank"), r"exactly one of setting="),
    (RewriteConfig(to="sparse", setting=1), r"unknown rewrite 'sparse'"),
    (RewriteConfig(to="lowrank", modules=["fc"], target_macs=0.01), r"target_macs=.* cannot be met by rewriting fc as lowrank"),
])
def test_bad_requests_name_the_module_and_leave_the_model_untouched(config, message):
    model = mixed()
    modules = dict(model.named_modules())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        rewrite_(model, x4(), config)
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torchslim.pruning_history(model)


def test_globs_skip_what_a_rewrite_cannot_take():
    model = mixed()
    plan, _ = plan_rewrite(model, x4(), RewriteConfig(to="lowrank", modules=["*"], setting=1))
    assert [p.name for p in plan.layers] == ["conv", "point", "fc"]  # not reflect (padding), dw (groups), custom
    assert not torchslim.pruning_history(model)


class TwoLayers(nn.Module):
    """A layer whose weight is exactly rank 3 (free to factorise) and a full-rank one of the same size."""

    def __init__(self) -> None:
        super().__init__()
        self.cheap = nn.Linear(48, 48, bias=False)
        self.dear = nn.Linear(48, 48, bias=False)
        with torch.no_grad():
            self.cheap.weight.copy_(torch.randn(48, 3) @ torch.randn(3, 48))

    def forward(self, x):
        return self.dear(torch.relu(self.cheap(x)))


def test_budget_takes_the_layer_with_least_error_per_mac_saved_first():
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(5, 48)
    reference = model(x)
    plan, _ = plan_rewrite(model, x, RewriteConfig(to="lowrank", target_macs=0.6))
    assert [p.name for p in plan.layers] == ["cheap"]
    assert plan.layers[0].setting >= 3 and plan.layers[0].fit_error < 1e-6
    assert plan.macs_after <= 0.6 * plan.model_macs
    result = rewrite_(model, x, RewriteConfig(to="lowrank", target_macs=0.6), plan=plan)
    assert result.macs_after == plan.macs_after
    torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)


def test_a_tighter_budget_rewrites_both_and_the_table_shows_each_layer():
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(5, 48)
    plan, _ = plan_rewrite(model, x, RewriteConfig(to="lowrank", target_macs=0.3))
    assert {p.name for p in plan.layers} == {"cheap", "dear"}
    assert plan.macs_after <= 0.3 * plan.model_macs
    table = plan.table()
    for p in plan.layers:
        assert p.name in table and f"rank={p.setting}" in table and f"{p.macs_before:,}" in table
    # the plan's errors are what rewriting gives
    result = rewrite_(model, x, RewriteConfig(to="lowrank", target_macs=0.3))
    assert result.errors == pytest.approx({p.name: p.fit_error for p in plan.layers}, rel=1e-9)


def test_absolute_target_and_exclude_and_filter():
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(5, 48)
    total = torchslim.rewrite.model_macs(model, x)
    plan, _ = plan_rewrite(model, x, RewriteConfig(to="lowrank", target_macs=total * 0.7, exclude=["cheap"]))
    assert [p.name for p in plan.layers] == ["dear"]
    plan, _ = plan_rewrite(model, x, RewriteConfig(to="lowrank", setting=2, filter_fn=lambda n, m: n == "cheap"))
    assert [p.name for p in plan.layers] == ["cheap"]


def test_the_budget_is_not_overshot_by_more_than_one_setting_step():
    from torchslim.rewrite.methods import METHODS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 8, 10, 10)
    plan, _ = plan_rewrite(model, x, RewriteConfig(to="separable", target_macs=0.5))
    target = 0.5 * plan.model_macs
    assert plan.macs_after <= target
    method = METHODS["separable"]
    for layer in plan.layers:  # any milder setting of any chosen layer would miss the target
        module = model.get_submodule(layer.name)
        positions = layer.macs_before // method.macs_per_position(module, None)
        for milder in range(layer.setting + 1, method.max_setting(module) + 1):
            extra = (method.macs_per_position(module, milder) - method.macs_per_position(module, layer.setting)) * positions
            if method.macs_per_position(module, milder) < method.macs_per_position(module, None):
                assert plan.macs_after + extra > target
