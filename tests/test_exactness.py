"""The exactness check: exact groups always checked at tolerance, inexact groups measured and
refused when they destroy the output, tolerances by dtype shared by ``prune_`` and ``verify``,
and every rollback said out loud."""
from __future__ import annotations

import copy
import importlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import torchslim
from torchslim.cli import main
from torchslim.pruning.prune import MAX_INEXACT_MEASURED, InexactPruningWarning, RolledBackWarning
from torchslim.pruning.verify import TOLERANCES, run_eval, tolerances, zero_removed_

verify_module = importlib.import_module("torchslim.pruning.verify")  # the package re-exports verify() by this name


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(now[k].shape == v.shape and torch.equal(now[k], v) for k, v in state.items())


def relative_l2(original: nn.Module, pruned: nn.Module, x, plan) -> float:
    """|pruned - zeroed original| / |zeroed original| on the (single) output, measured here."""
    reference = copy.deepcopy(original)
    zero_removed_(reference, plan.removed)
    expected, actual = run_eval(reference, x)[0].double(), run_eval(pruned, x)[0].double()
    return float((actual - expected).norm() / expected.norm())


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


class ScaleReadInPython(nn.Module):
    """An exact group (``a``) whose activations are scaled by a width read in Python, next to
    an inexact group (``b`` feeds a LayerNorm). Pruning ``a`` changes the scale: a wrong
    number that only a check at tolerance sees."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x)) * (16.0 / self.a.out_features)
        return self.head(self.norm(self.b(h)))


class JointScale(nn.Module):
    """Two exact groups, each exact alone; removed together, a width read in Python changes
    the output (``max`` of both widths), so no single group is at fault."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)
        self.head_a = nn.Linear(16, 4)
        self.head_b = nn.Linear(16, 4)

    def forward(self, x):
        scale = 16.0 / max(self.a.out_features, self.b.out_features)
        return self.head_a(torch.relu(self.a(x)) * scale) + self.head_b(torch.relu(self.b(x)) * scale)


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv (NFNet's ScaledStdConv2d without the gain): every output
    filter is normalised over its fan-in, so removed input channels change its statistics."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class StdConvNet(nn.Module):
    """A small NFNet stand-in: a stack of weight-standardised convs, no normalisation layers."""

    def __init__(self, width: int = 16, depth: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(*[StdConv2d(width, width, 3, padding=1) for _ in range(depth)])
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for conv in self.body:
            x = torch.relu(conv(x))
        return self.head(x)


class NormChain(nn.Module):
    """``n`` Linear -> LayerNorm blocks: ``n`` separate inexact groups."""

    def __init__(self, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8 if i == 0 else 12, 12), nn.LayerNorm(12)) for i in range(n))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


class Literal(nn.Module):
    """A literal 16 in a reshape that no attribute holds: pruning ``a`` breaks the forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = y.reshape(1, 16, -1).reshape(1, 16, 4, 4)
        return self.b(y)


# ---------------------------------------------------------------------------------------
# exact groups are checked even when inexact groups are removed in the same pass
# ---------------------------------------------------------------------------------------


def test_exact_group_is_checked_next_to_an_inexact_one():
    torch.manual_seed(0)
    model, x = ScaleReadInPython().eval(), torch.randn(2, 5, 8)
    with pytest.warns(RolledBackWarning, match=r"modules 'a'"):
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exact_only=False))
    assert model.a.out_features == 16, "the exact group whose removal changes the output was kept"
    assert model.b.out_features < 16, "the inexact group was still pruned"
    assert any("'a'" in reason for reason in result.skipped)
    assert [entry["modules"] for entry in result.inexact_groups] == [["b", "head", "norm"]]


# ---------------------------------------------------------------------------------------
# inexact groups: measured, reported, refused when they destroy the output
# ---------------------------------------------------------------------------------------


def test_inexact_groups_are_reported_with_their_measured_deviation():
    torch.manual_seed(0)
    model, x = NormChain(1).eval(), torch.randn(2, 5, 8)
    original = copy.deepcopy(model)
    with pytest.warns(InexactPruningWarning, match=r"blocks\.0\.0.*LayerNorm|layer_norm"):
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exact_only=False))
    [entry] = result.inexact_groups
    assert entry["modules"] == ["blocks.0.0", "blocks.0.1", "head"]
    assert any("layer_norm" in why and "blocks.0.1" in why for why in entry["why"])
    assert entry["atoms_removed"] == 6
    measured = relative_l2(original, model, x, result.plan)
    assert 0 < measured < 0.75
    assert entry["deviation"] == pytest.approx(measured, rel=1e-4)
    assert result.inexact_deviation == pytest.approx(measured, rel=1e-4)
    assert not torchslim.verify(original, model, x, result.plan).ok  # inexact: not the zeroed original


def test_each_inexact_group_is_measured_alone_up_to_a_bound():
    torch.manual_seed(0)
    n = MAX_INEXACT_MEASURED + 2
    model, x = NormChain(n).eval(), torch.randn(2, 5, 8)
    original = copy.deepcopy(model)
    with pytest.warns(InexactPruningWarning):
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exact_only=False))
    assert len(result.inexact_groups) == n
    measured = [e for e in result.inexact_groups if e["deviation"] is not None]
    assert len(measured) == MAX_INEXACT_MEASURED
    # a group's own deviation is what pruning that group alone (same channels) gives
    first = min(measured, key=lambda e: e["group"])
    alone = copy.deepcopy(original)
    alone_result = torchslim.prune_(alone, x, torchslim.PruneConfig(ratio=0.5, exact_only=False, op_names=[first["modules"][0]]))
    assert len(alone_result.inexact_groups) == 1
    assert first["deviation"] == pytest.approx(relative_l2(original, alone, x, alone_result.plan), rel=1e-4)


def test_inexact_deviation_that_destroys_the_output_is_refused_unless_allowed():
    torch.manual_seed(0)
    model, x = StdConvNet().eval(), torch.randn(1, 3, 12, 12)
    original, state = copy.deepcopy(model), state_of(model)
    with pytest.raises(torchslim.PruningError, match=r"max_inexact_deviation=0\.75") as info:
        torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exact_only=False))
    message = str(info.value)
    assert "rolled back" in message and "body." in message and "exact_only=True" in message
    assert unchanged(model, state) and model.body[0].in_channels == 16

    with pytest.warns(InexactPruningWarning):
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exact_only=False, max_inexact_deviation=None))
    assert result.inexact_deviation == pytest.approx(relative_l2(original, model, x, result.plan), rel=1e-4)
    assert result.inexact_deviation > 0.75
    assert all(e["why"] and "batch_norm" in e["why"][0] for e in result.inexact_groups)


def test_exact_only_needs_no_deviation_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.LayerNorm(12), nn.Linear(12, 3)).eval()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    assert model[0].out_features == 6 and model[2].out_features == 12  # the exact group only
    assert result.inexact_groups == [] and result.inexact_deviation is None


# ---------------------------------------------------------------------------------------
# tolerances follow the dtype; prune_ and verify share them
# ---------------------------------------------------------------------------------------


def test_tolerances_by_dtype_loosest_wins_and_explicit_values_win():
    for dtype, expected in TOLERANCES.items():
        assert tolerances([torch.zeros(1, dtype=dtype)]) == expected
    mixed = [torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long)]
    assert tolerances(mixed) == TOLERANCES[torch.bfloat16]
    assert tolerances(mixed, atol=0.0, rtol=1e-3) == (0.0, 1e-3)
    assert tolerances([torch.zeros(1, dtype=torch.long)]) == TOLERANCES[torch.float32]
    assert torchslim.PruneConfig().atol is None and torchslim.PruneConfig().rtol is None


def test_tf32_float32_on_gpu_gets_float16_tolerances(monkeypatch):
    monkeypatch.setattr(verify_module, "_tf32_enabled", lambda: True)
    assert verify_module._dtype_tolerances(torch.float32, "cuda") == TOLERANCES[torch.float16]
    assert verify_module._dtype_tolerances(torch.float32, "cpu") == TOLERANCES[torch.float32]
    monkeypatch.setattr(verify_module, "_tf32_enabled", lambda: False)
    assert verify_module._dtype_tolerances(torch.float32, "cuda") == TOLERANCES[torch.float32]


@pytest.mark.parametrize("field,value", [("atol", -1.0), ("rtol", -1e-3), ("max_inexact_deviation", 0.0)])
def test_tolerance_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=f"PruneConfig.{field}"):
        torchslim.PruneConfig(**{field: value})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_resnet18_prunes_and_verifies(dtype):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(dtype)
    x = torch.randn(1, 3, 96, 96, dtype=dtype)
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    assert result.plan and not result.skipped and result.params_after < result.params_before / 2
    assert torchslim.verify(original, model, x, result.plan).ok  # same default meaning as prune_'s check
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.fc.bias[0] += 1.0
    assert not torchslim.verify(original, nudged, x, result.plan).ok  # and still catches a wrong number


def test_cli_prunes_bfloat16(tmp_path):
    out = tmp_path / "pruned"  # bfloat16 kernels are slow on CPU: time one run per round
    assert main(["prune", "torchvision:resnet18", "--input", "1,3,96,96", "--dtype", "bfloat16", "--ratio", "0.5",
                 "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["exact"] is True and report["params"][1] < report["params"][0] / 2


def test_no_single_culprit_message_names_no_module():
    torch.manual_seed(0)
    model, x = JointScale().eval(), torch.randn(2, 8)
    state = state_of(model)
    with pytest.raises(torchslim.PruningError) as info:
        torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    message = str(info.value)
    assert "named here" not in message
    assert "No single group fails alone" in message and "loosen PruneConfig.atol/rtol" in message
    assert unchanged(model, state)


# ---------------------------------------------------------------------------------------
# a rollback that leaves channels in place is said out loud
# ---------------------------------------------------------------------------------------


def test_rollback_warns_naming_op_and_module():
    model, x = Literal().eval(), torch.randn(1, 3, 4, 4)
    with pytest.warns(RolledBackWarning, match=r"aten\.view\.default in module '<root>'"):
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    assert not result.plan and result.skipped


def test_clean_pruning_does_not_warn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = torchslim.prune_(model, torch.randn(1, 3, 8, 8), torchslim.PruneConfig(ratio=0.5))
    assert result.plan and not result.skipped
