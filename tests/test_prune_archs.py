"""Exactness over the architecture zoo, all-or-nothing failures, config handling.

Contract under test (the public API only)::

    result = torchslim.prune_(model, example_inputs, torchslim.PruneConfig(...))   # in place
    result.plan.removed   # {param_or_buffer_name: {dim: [removed indices]}}, relative to the original
    result.macs_before, result.macs_after, result.params_before, result.params_after
    torchslim.verify(original, pruned, example_inputs, result.plan).ok   # == the zeroed original

Every pruned model must equal its original with the removed slices zeroed; a pruning that
cannot be done must either leave the offending group alone or raise with the model exactly
as it was.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.archs import (  # noqa: E402
    ARCHS, IBNorm, attribute_problems, cbr, flat_outputs, num_params, output_structure, plan_problems, run, snapshot,
    snapshot_diff,
)

import torchslim  # noqa: E402

NAMES = sorted(ARCHS)
SLOW = {name for name, arch in ARCHS.items() if arch.slow}


def _with_slow_marks(names, slow_for=()):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow_for else n for n in names]


def prune_and_check(name: str, config: "torchslim.PruneConfig", *, check_exact: bool):
    """Prune a fresh copy of ``ARCHS[name]`` and run every generic check; return (original, model, inputs, result)."""
    arch = ARCHS[name]
    model, inputs = arch()
    original = copy.deepcopy(model)
    reference_out = run(original, inputs)
    before = snapshot(model)
    result = torchslim.prune_(model, inputs, config)

    # the pruned model runs and returns the same structure with the same shapes
    out = run(model, inputs)
    assert output_structure(out) == output_structure(reference_out), f"{name}: outputs changed shape"
    assert all(torch.isfinite(t).all() for t in flat_outputs(out) if t.is_floating_point())

    # accounting
    assert result.params_before == num_params(original)
    assert result.params_after == num_params(model)
    assert result.macs_after <= result.macs_before

    # the plan describes exactly what happened to every parameter and buffer
    problems = plan_problems(result.plan.removed, original, model)
    assert not problems, f"{name}: " + "; ".join(problems[:8])
    # module attributes follow the tensors (out_channels, num_features, normalized_shape...)
    problems = attribute_problems(model)
    assert not problems, f"{name}: " + "; ".join(problems[:8])

    if result.plan.removed:
        assert result.params_after < result.params_before
    else:  # nothing pruned: nothing touched (same tensor objects, values and attributes)
        assert result.params_after == result.params_before
        problems = snapshot_diff(before, model)
        assert not problems, f"{name}: empty plan but the model changed: {problems[:6]}"

    if check_exact:
        report = torchslim.verify(original, model, inputs, result.plan)
        assert report.ok, f"{name}: pruned model differs from the zeroed original ({report.max_abs_error:.3g})"
        assert 0.0 <= report.max_abs_error < math.inf
    return original, model, inputs, result


# ---------------------------------------------------------------------------------------
# the zoo itself (no engine needed)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_archs_forward(name):
    arch = ARCHS[name]
    model, inputs = arch()
    assert not model.training
    out1, out2 = run(model, inputs), run(model, inputs)
    t1, t2 = flat_outputs(out1), flat_outputs(out2)
    assert t1 and all(torch.equal(a, b) for a, b in zip(t1, t2)), "forward must be deterministic in eval mode"
    assert all(torch.isfinite(t).all() for t in t1 if t.is_floating_point())
    # builds are deterministic: two builds have identical weights and inputs
    model2, inputs2 = arch()
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # norms were randomised (no BN with the default running_var == 1 survives)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_var is not None:
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
    # must_shrink names exist
    state = model.state_dict()
    for key in arch.must_shrink:
        for k in key.split("|"):
            assert k in state, f"{name}: must_shrink names unknown tensor {k}"


def _op_fingerprint(model: nn.Module, inputs) -> tuple:
    """The aten ops one forward runs, with their tensor arguments' shapes, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append((str(func), tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        run(model, inputs)
    return tuple(recorder.ops)


def test_zoo_size():
    """At least 40 architectures that are really different: no two entries run the same ops on
    the same shapes (an alias, or an entry whose variant flag changes nothing, does not count)."""
    entries: dict[tuple, list[str]] = {}
    for name in NAMES:
        entries.setdefault(_op_fingerprint(*ARCHS[name]()), []).append(name)
    duplicates = [names for names in entries.values() if len(names) > 1]
    assert not duplicates, f"entries running identical ops: {duplicates}"
    assert len(entries) >= 40


# ---------------------------------------------------------------------------------------
# exactness over the zoo
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_prune_exact_l1(name):
    """ratio 0.5, L1, exact groups only: something is removed (where possible) and the result is exact."""
    arch = ARCHS[name]
    original, model, inputs, result = prune_and_check(
        name, torchslim.PruneConfig(ratio=0.5, criterion="l1", exact_only=True), check_exact=True)
    if arch.expect_pruned:
        assert result.plan.removed, f"{name}: nothing was pruned"
        assert result.params_after < result.params_before
        assert result.macs_after < result.macs_before
    else:
        assert not result.plan.removed
    before, after = original.state_dict(), model.state_dict()
    for key in arch.must_shrink:
        options = key.split("|")
        assert any(after[k].numel() < before[k].numel() for k in options), \
            f"{name}: {key} was not pruned ({[tuple(after[k].shape) for k in options]})"


@pytest.mark.parametrize("name", _with_slow_marks(NAMES, SLOW))
def test_prune_default_l2(name):
    """ratio 0.5, L2, default config (inexact groups allowed): runs, keeps shapes; exact where the arch is."""
    arch = ARCHS[name]
    _, _, _, result = prune_and_check(name, torchslim.PruneConfig(ratio=0.5, criterion="l2"), check_exact=arch.exact)
    if arch.expect_pruned:
        assert result.plan.removed and result.params_after < result.params_before


@pytest.mark.parametrize("name", ["serial_conv_bn_relu", "residual_add", "concat_same_twice", "split_chunk",
                                  "depthwise", "grouped_conv_shuffle", "pixel_shuffle", "modnet_mini",
                                  "llama_gqa_rmsnorm_swiglu", "vit_cls_pos_embed"])
def test_prune_twice_stays_exact(name):
    model, inputs = ARCHS[name]()
    original = copy.deepcopy(model)
    first = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    once = copy.deepcopy(model)
    second = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.3, criterion="random", seed=1,
                                                                   exact_only=True))
    assert first.plan.removed
    assert not plan_problems(second.plan.removed, once, model)
    report = torchslim.verify(once, model, inputs, second.plan)
    assert report.ok, f"second pruning differs from the once-pruned model by {report.max_abs_error:.3g}"
    assert second.params_before == num_params(once) and second.params_after == num_params(model)
    assert second.plan and second.params_after < second.params_before, "the second pruning removed nothing"
    # composed plans are relative to the original: both prunings together equal the zeroed original
    both = first.plan.extend(second.plan)
    assert torchslim.verify(original, model, inputs, both).ok
    assert not torchslim.verify(original, model, inputs, first.plan).ok, "the second pruning changed nothing"


def test_modnet_ibnorm_split_follows_pruning():
    """IBNorm's split point (an int set in __init__) follows the pruned channels; BN stats are kept."""
    _, model, _, result = prune_and_check("modnet_mini", torchslim.PruneConfig(ratio=0.5, criterion="random", seed=3),
                                          check_exact=True)
    assert result.plan.removed
    fresh, _ = ARCHS["modnet_mini"]()
    changed = 0
    for name, m in model.named_modules():
        if isinstance(m, IBNorm):
            assert m.bnorm_channels == m.bnorm.num_features == m.bnorm.weight.shape[0] == m.bnorm.running_mean.shape[0], name
            changed += m.bnorm_channels != fresh.get_submodule(name).bnorm_channels
    assert changed, "no IBNorm was pruned"


# ---------------------------------------------------------------------------------------
# verify itself must be able to fail, or every exactness test above is vacuous
# ---------------------------------------------------------------------------------------


def test_verify_identity_and_detects_differences():
    model, x = ARCHS["residual_add"]()
    original = copy.deepcopy(model)
    # identity: an unpruned copy under an empty plan is exact
    assert torchslim.verify(original, copy.deepcopy(original), x, torchslim.PruningPlan()).ok
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, criterion="random", seed=1, exact_only=True))
    assert result.plan.removed
    assert torchslim.verify(original, model, x, result.plan).ok
    # a surviving weight nudged: must be caught
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.head.weight[0, 0] += 0.5
    bad = torchslim.verify(original, broken, x, result.plan)
    assert not bad.ok and bad.max_abs_error > 1e-3
    # the plan of a different pruning (same widths, other channels) does not explain this model
    other = copy.deepcopy(original)
    other_result = torchslim.prune_(other, x, torchslim.PruneConfig(ratio=0.5, criterion="random", seed=2, exact_only=True))
    assert other_result.plan.removed != result.plan.removed, "seeds 1 and 2 chose the same channels"
    assert other_result.plan.removed.keys() == result.plan.removed.keys()  # same widths
    assert not torchslim.verify(original, model, x, other_result.plan).ok


def test_ratio_zero_changes_nothing():
    model, x = ARCHS["residual_add"]()
    before = snapshot(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.0))
    assert not result.plan.removed
    assert result.params_after == result.params_before and result.macs_after == result.macs_before
    assert not snapshot_diff(before, model)


@pytest.mark.parametrize("form", ["tensor", "tuple", "args_kwargs"])
def test_example_input_forms_give_the_same_plan(form):
    model, x = ARCHS["serial_conv_bn_relu"]()
    reference = copy.deepcopy(model)
    expected = torchslim.prune_(reference, x, torchslim.PruneConfig(ratio=0.5)).plan.removed
    inputs = {"tensor": x, "tuple": (x,), "args_kwargs": ((x,), {})}[form]
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5))
    assert result.plan.removed == expected


def test_random_criterion_is_seeded():
    plans = []
    for seed in (5, 5, 6):
        model, x = ARCHS["serial_conv_bn_relu"]()
        plans.append(torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, criterion="random", seed=seed)).plan.removed)
    assert plans[0] == plans[1]
    assert plans[0] != plans[2]


# ---------------------------------------------------------------------------------------
# all-or-nothing: literal channel counts, failing surgery, errors
# ---------------------------------------------------------------------------------------


class LiteralChannels(nn.Module):
    """A custom module whose forward hard-codes the channel count of ``a``'s output (16).

    No attribute holds that 16 except ``num_groups``, an unrelated number that happens to
    be equal (a trap for attribute rewriting). ``b``/``tail`` form an independent,
    legitimately prunable group.
    """

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.num_groups = 16
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.tail = cbr(12, 12)
        self.head = nn.Conv2d(12, 4, 1)
        self.gate = nn.Parameter(torch.rand(1, 1, 1, 1) + 0.5)

    def forward(self, x):
        y = F.relu(self.bn(self.a(x)))
        b, _, h, w = y.shape
        if self.mode == "view":
            y = y.view(b, 16, h * w).view(b, 16, h, w)
        elif self.mode == "reshape":
            y = y.reshape(b * 16, h, w).reshape(b, 16, h, w)
        elif self.mode == "split":
            y = torch.cat(torch.split(y, [8, 8], dim=1)[::-1], 1)
        elif self.mode == "slice":
            y = torch.cat([y[:, 8:], y[:, :8]], 1)
        elif self.mode == "ones":
            y = y + torch.ones(1, 16, 1, 1)
        elif self.mode == "expand":
            y = y * self.gate.expand(b, 16, h, w)
        return self.head(self.tail(self.b(y)))


LITERAL_MODES = ["view", "reshape", "split", "slice", "ones", "expand"]


def assert_all_or_nothing(model: nn.Module, inputs, config, *, keep: dict[str, int] = ()):
    """prune_ either raises with the model exactly as before, or succeeds exactly.

    ``keep``: module name -> out_channels that a successful pruning must leave alone.
    Returns the result, or None if prune_ raised.
    """
    original = copy.deepcopy(model)
    before = snapshot(model)
    out_before = flat_outputs(run(model, inputs))
    try:
        result = torchslim.prune_(model, inputs, config)
    except Exception as exc:  # noqa: BLE001 - any error is allowed, a half-pruned model is not
        problems = snapshot_diff(before, model)
        assert not problems, f"prune_ raised {type(exc).__name__} but left the model changed: {problems[:6]}"
        out_after = flat_outputs(run(model, inputs))
        assert all(torch.equal(a, b) for a, b in zip(out_before, out_after))
        assert isinstance(exc, (torchslim.PruningError, ValueError)), f"unexpected error type {type(exc).__name__}: {exc}"
        assert str(exc), "the error must say what failed"
        return None
    assert not plan_problems(result.plan.removed, original, model)
    assert not attribute_problems(model), attribute_problems(model)
    if not result.plan.removed:  # left everything unpruned: then nothing at all may have changed
        problems = snapshot_diff(before, model)
        assert not problems, f"empty plan but the model changed: {problems[:6]}"
    report = torchslim.verify(original, model, inputs, result.plan)
    assert report.ok, f"pruned model differs from the zeroed original by {report.max_abs_error:.3g}"
    for module_name, channels in dict(keep).items():
        assert model.get_submodule(module_name).weight.shape[0] == channels, f"{module_name} was pruned"
    return result


@pytest.mark.parametrize("mode", LITERAL_MODES)
def test_literal_channel_count_is_all_or_nothing(mode):
    torch.manual_seed(0)
    model = LiteralChannels(mode)
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(1, 3, 8, 8)
    # where forward cannot run with fewer channels, a's group must stay whole
    keep = {} if mode == "slice" else {"a": 16}
    result = assert_all_or_nothing(model, x, torchslim.PruneConfig(ratio=0.5), keep=keep)
    if result is not None:
        assert model.num_groups == 16, "an unrelated attribute equal to the literal was rewritten"
        assert run(model, x) is not None


class ReadOnlyConv(nn.Conv2d):
    """A conv subclass whose out_channels cannot be changed once set: surgery on it fails midway."""

    def __setattr__(self, name, value):
        if name == "out_channels" and "out_channels" in self.__dict__ and value != self.__dict__["out_channels"]:
            raise AttributeError("ReadOnlyConv.out_channels is read-only")
        super().__setattr__(name, value)


class ReadOnlyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ReadOnlyConv(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.b = cbr(16, 12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.head(self.b(F.relu(self.bn(self.a(x)))))


def test_failure_during_surgery_rolls_back():
    """An exception in the middle of physical removal: nothing may stay half-applied."""
    torch.manual_seed(0)
    model = ReadOnlyNet().eval()
    x = torch.randn(1, 3, 8, 8)
    assert_all_or_nothing(model, x, torchslim.PruneConfig(ratio=0.5))


def test_failing_module_handler_rolls_back():
    register = getattr(torchslim, "register_module_handler", None)
    if register is None:
        pytest.skip("no register_module_handler in this build")

    class Scale(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
            self.channels = c

        def forward(self, x):
            return x * self.weight

    @register(Scale)
    def _explode(module, ctx):
        raise RuntimeError("handler failed")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = cbr(3, 16)
            self.scale = Scale(16)
            self.b = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.b(self.scale(self.a(x)))

    torch.manual_seed(0)
    model = Net().eval()
    result = assert_all_or_nothing(model, torch.randn(1, 3, 8, 8), torchslim.PruneConfig(ratio=0.5))
    if result is not None:
        assert model.scale.weight.shape[0] == 16


@pytest.mark.parametrize("config", [
    dict(op_names=["no_such_module"]),
    dict(target_macs=1e-9),
], ids=["op_names_match_nothing", "unreachable_target_macs"])
def test_errors_leave_model_untouched(config):
    model, x = ARCHS["residual_add"]()
    assert_all_or_nothing(model, x, torchslim.PruneConfig(**config))


def test_op_names_matching_nothing_is_an_error():
    model, x = ARCHS["residual_add"]()
    with pytest.raises(ValueError, match="op_names"):
        torchslim.prune_(model, x, torchslim.PruneConfig(op_names=["no_such_module"]))


# ---------------------------------------------------------------------------------------
# exclude / op_names
# ---------------------------------------------------------------------------------------


def _serial():
    return ARCHS["serial_conv_bn_relu"]()


def test_exclude_keeps_out_channels():
    model, x = _serial()
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exclude=["conv1"]))
    assert model.conv1.weight.shape[0] == 16 and model.conv1.bias.shape[0] == 16
    assert model.bn1.weight.shape[0] == 16 and model.conv2.weight.shape[1] == 16
    assert "conv1.weight" not in result.plan.removed or 0 not in result.plan.removed["conv1.weight"]
    assert model.conv2.weight.shape[0] < 24 and model.conv3.weight.shape[0] < 16  # the rest is still pruned
    assert not attribute_problems(model), attribute_problems(model)
    assert torchslim.verify(original, model, x, result.plan).ok


def test_exclude_resnet_stem():
    model, x = ARCHS["tv_resnet18"]()
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exclude=["conv1"]))
    # conv1's output is the residual stream of layer1: it stays whole, and so does everything coupled to it
    assert model.conv1.weight.shape[0] == 64 and model.bn1.running_mean.shape[0] == 64
    assert model.layer1[0].conv2.weight.shape[0] == 64 and model.layer1[1].bn2.weight.shape[0] == 64
    assert model.layer1[0].conv1.weight.shape[0] < 64  # inner widths are still pruned
    assert model.layer2[0].conv2.weight.shape[0] < 128  # and later stages' residual streams too
    assert not attribute_problems(model), attribute_problems(model)[:5]
    assert torchslim.verify(original, model, x, result.plan).ok


def test_op_names_restricts_to_the_named_group():
    model, x = _serial()
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, op_names=["conv2"]))
    allowed = {"conv2.weight": {0}, "conv2.bias": {0}, "bn2.weight": {0}, "bn2.bias": {0}, "bn2.running_mean": {0},
               "bn2.running_var": {0}, "conv3.weight": {1}}
    assert result.plan.removed, "op_names=['conv2'] pruned nothing"
    for name, dims in result.plan.removed.items():
        assert name in allowed and set(dims) <= allowed[name], f"op_names leaked to {name} {sorted(dims)}"
    assert model.conv1.weight.shape[0] == 16 and model.conv3.weight.shape[0] == 16 and model.conv2.weight.shape[0] < 24
    assert not attribute_problems(model), attribute_problems(model)
    assert torchslim.verify(original, model, x, result.plan).ok


def test_op_names_and_exclude_together():
    model, x = _serial()
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, op_names=["conv1", "conv2"], exclude=["conv2"]))
    assert model.conv2.weight.shape[0] == 24 and model.conv3.weight.shape[0] == 16
    assert model.conv1.weight.shape[0] < 16 and result.plan.removed


# ---------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("ratio", 1.5), ("ratio", -0.1), ("ratio", 1.0), ("ratio", math.nan),
    ("round_to", 0), ("round_to", -8),
    ("criterion", "bogus"),
    ("target_macs", 0), ("target_macs", -0.5),
    ("exclude", "conv1"), ("op_names", "conv1"),
])
def test_invalid_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        torchslim.PruneConfig(**{field: value})


def test_valid_config_defaults():
    cfg = torchslim.PruneConfig()
    # round_to=None: multiples of 8 under the default MACs-target ranking, single channels otherwise
    assert 0 <= cfg.ratio < 1 and cfg.round_to is None and cfg.target_macs is None and cfg.op_names is None
    torchslim.PruneConfig(ratio=0.0)
    torchslim.PruneConfig(ratio=0.99, criterion="l2", round_to=8, target_macs=0.5, exclude=["a.*"], op_names=["b"])
