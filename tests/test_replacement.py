"""Module replacements recorded in the plan: a rewritten model (conv+bn folded, blocks replaced)
saves and loads into a freshly built original bit for bit, with an allow-list of module types;
a tampered plan is refused with the step, module and type named, the model left untouched."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from _checkpoint_edits import rewrite_plan

import torchslim
from torchslim.io import CheckpointError
from torchslim import pruning_history
from torchslim.pruning import PruningPlan, Transaction, register_replacement_type, replace_module_, replacement_types
from torchslim.pruning.replace import REPLACEMENT_TYPES


pytestmark = pytest.mark.usefixtures("one_thread")


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def cnn(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    model = CNN()
    with torch.no_grad():  # trained-looking BatchNorm statistics, so folding is not an identity
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


@torch.no_grad()
def fold(model: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold a BatchNorm into the conv before it: a conv with bias, and an Identity."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True).eval()
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    fused.bias.copy_(bn.bias - bn.running_mean * scale)
    replace_module_(model, conv_name, fused)
    replace_module_(model, bn_name, nn.Identity())


def snapshot(model: nn.Module):
    modules = {name: m for name, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return modules, state


def assert_untouched(model: nn.Module, snap) -> None:
    modules, state = snap
    assert {name: m for name, m in model.named_modules()} == modules  # the same module objects
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())


def test_folded_conv_bn_saves_and_loads_bit_identically(tmp_path):
    model, x = cnn(), torch.randn(2, 3, 16, 16)
    reference = model(x)
    fold(model, "conv1", "bn1")
    folded = model(x)
    assert torch.allclose(folded, reference, atol=1e-5)  # the rewrite itself is right
    assert isinstance(model.bn1, nn.Identity) and model.conv1.bias is not None
    torchslim.save(model, tmp_path / "ckpt")
    plan = json.loads((tmp_path / "ckpt" / "plan.json").read_text())
    assert plan["format"] == "torchslim.plan/2"
    assert plan["steps"][1]["replaced"] == {"bn1": {"type": "torch.nn.Identity", "init": {}}}
    assert plan["steps"][0]["replaced"]["conv1"]["init"]["bias"] is True
    loaded = torchslim.load(tmp_path / "ckpt", cnn(seed=3))
    assert type(loaded.bn1) is nn.Identity and type(loaded.conv1) is nn.Conv2d
    assert not loaded.conv1.training and not loaded.training
    assert torch.equal(loaded(x), folded)
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_a_plan_without_replacements_stays_format_1(tmp_path):
    model, x = cnn(), torch.randn(1, 3, 16, 16)
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.25))
    torchslim.save(model, tmp_path / "ckpt")
    data = json.loads((tmp_path / "ckpt" / "plan.json").read_text())
    assert data["format"] == "torchslim.plan/1" and all("replaced" not in s for s in data["steps"])
    assert torch.equal(torchslim.load(tmp_path / "ckpt", cnn(seed=1))(x), model(x))


@pytest.mark.parametrize("order", ["replace_then_prune", "prune_then_replace", "prune_replace_prune"])
def test_replacement_and_channel_pruning_round_trip(tmp_path, order):
    model, x = cnn(), torch.randn(2, 3, 16, 16)
    steps = {"replace_then_prune": ["fold", "prune"], "prune_then_replace": ["prune", "fold"],
             "prune_replace_prune": ["prune", "fold", "prune"]}[order]
    for what in steps:
        if what == "fold":
            fold(model, "conv1", "bn1")
        else:
            result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.25))
            assert result.plan.num_removed > 0
    assert model.conv1.out_channels < 8 and isinstance(model.bn1, nn.Identity)
    torchslim.save(model, tmp_path / "ckpt")
    loaded = torchslim.load(tmp_path / "ckpt", cnn(seed=5))
    assert torch.equal(loaded(x), model(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    # the loaded model keeps its history: it can be pruned and saved again
    torchslim.prune_(loaded, x, torchslim.PruneConfig(ratio=0.25))
    torchslim.save(loaded, tmp_path / "again")
    assert torch.equal(torchslim.load(tmp_path / "again", cnn(seed=6))(x), loaded(x))


def test_replacement_is_recorded_in_the_history():
    model = cnn()
    assert not pruning_history(model)
    old = replace_module_(model, "bn2", nn.Identity())
    assert isinstance(old, nn.BatchNorm2d)
    plan = pruning_history(model)
    assert plan and plan.steps[0].replaced == {"bn2": {"type": "torch.nn.Identity", "init": {}}}
    assert PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).steps[0].replaced == plan.steps[0].replaced




@pytest.fixture
def folded_checkpoint(tmp_path):
    model = cnn()
    fold(model, "conv1", "bn1")
    return torchslim.save(model, tmp_path / "ckpt")


def _replaced(data: dict, step: int = 0) -> dict:
    return data["steps"][step]["replaced"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: _replaced(d, 1)["bn1"].update(type="os.system"),
     r"step 2: cannot replace module 'bn1': type 'os.system' is not an allowed replacement type"),
    (lambda d: _replaced(d, 1)["bn1"].update(type="builtins.eval"), r"step 2.*'bn1'.*'builtins.eval' is not an allowed"),
    (lambda d: _replaced(d)["conv1"]["init"].update(in_channels=[3, {"x": float("nan")}]),
     r"step 1: cannot replace module 'conv1': type 'torch.nn.Conv2d': init\['in_channels'\]\[1\]\['x'\] is nan"),
    (lambda d: _replaced(d)["conv1"]["init"].update(nonsense=1),
     r"step 1: cannot replace module 'conv1': type 'torch.nn.Conv2d' cannot be built .*nonsense"),
    (lambda d: _replaced(d)["conv1"].update(init=[3, 8]), r"steps\[0\].replaced\['conv1'\].init \(torch.nn.Conv2d\) must be an object"),
    (lambda d: _replaced(d)["conv1"].update(code="x"), r"steps\[0\].replaced\['conv1'\] must be an object with exactly 'type' and 'init'"),
    (lambda d: _replaced(d).update({"head.conv": {"type": "torch.nn.Identity", "init": {}}}),
     r"step 1: the plan replaces module 'head.conv' by 'torch.nn.Identity', but the model .* has no such module"),
    (lambda d: d.update(format="torchslim.plan/1"), r"steps\[0\] has unknown key\(s\) \['replaced'\]"),
    (lambda d: _replaced(d)["conv1"]["init"].update(bias=False), r"missing key\(s\) 'conv1.bias'|unexpected key\(s\) 'conv1.bias'"),
    (lambda d: _replaced(d)["conv1"]["init"].update(out_channels=6), r"'conv1.weight' has shape \[8, 3, 3, 3\], the model after the plan has \[6, 3, 3, 3\]"),
])
def test_tampered_replacements_are_refused_and_the_model_is_untouched(folded_checkpoint, edit, message):
    rewrite_plan(folded_checkpoint, edit)
    model = cnn(seed=2)
    snap = snapshot(model)
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=message):
        torchslim.load(folded_checkpoint, model)
    assert_untouched(model, snap)
    assert not pruning_history(model)
    assert torch.equal(torch.get_rng_state(), rng)  # building the replacements consumed no randomness


def test_loading_does_not_consume_randomness(folded_checkpoint):
    model = cnn(seed=2)
    rng = torch.get_rng_state()
    torchslim.load(folded_checkpoint, model)
    assert torch.equal(torch.get_rng_state(), rng)


def test_transaction_rolls_back_a_module_swap():
    model = cnn()
    snap = snapshot(model)
    tx = Transaction()
    old = tx.replace_module(model, "bn1", nn.Identity())
    tx.replace_module(model, "conv1", nn.Conv2d(3, 8, 1))
    assert old is snap[0]["bn1"] and isinstance(model.bn1, nn.Identity)
    tx.rollback()
    assert_untouched(model, snap)


@pytest.mark.parametrize("new, init, message", [
    (nn.Conv2d(3, 8, 3, stride=2, padding=1), {"in_channels": 3, "out_channels": 8, "kernel_size": 3, "padding": 1},
     r"does not rebuild the module given"),
    (nn.Conv2d(3, 8, 3, padding=1), {"in_channels": 3, "out_channels": 8, "kernel_size": torch.tensor(3), "padding": 1},
     r"init\['kernel_size'\] is a Tensor"),
    (nn.Conv2d(3, 8, 3, padding=1), {"in_channels": 3, "out_channels": 8, "kernel_size": 3, "padding": float("inf")},
     r"init\['padding'\] is inf"),
    (nn.Sequential(nn.Identity()), None, r"Sequential is not an allowed replacement type"),
    (nn.Conv2d(3, 8, 3), None, None),  # derived init: fine, but the path is wrong
])
def test_replace_module_refuses_bad_inputs_and_touches_nothing(new, init, message):
    model = cnn()
    snap = snapshot(model)
    path = "conv1" if message else "nope.conv"
    with pytest.raises(ValueError, match=message or "has no module 'nope'"):
        replace_module_(model, path, new, init=init)
    assert_untouched(model, snap)
    assert not pruning_history(model)


def test_replace_module_with_given_init_and_subclass_is_not_its_base():
    model = cnn()
    replace_module_(model, "conv2", nn.Conv2d(8, 16, (3, 3), stride=2, padding=1),
                    init={"in_channels": 8, "out_channels": 16, "kernel_size": (3, 3), "stride": 2, "padding": 1})
    assert pruning_history(model).steps[0].replaced["conv2"]["init"]["kernel_size"] == [3, 3]

    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(ValueError, match="MyConv is not an allowed replacement type"):
        replace_module_(model, "conv1", MyConv(3, 8, 3, padding=1))


class Scale(nn.Module):
    """A user type: a per-channel scale."""

    def __init__(self, channels: int, value: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), value))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.weight.numel()}"


@pytest.fixture
def scale_type():
    register_replacement_type(Scale, "tests.Scale", init_of=lambda m: {"channels": m.weight.numel()})
    yield
    del REPLACEMENT_TYPES["tests.Scale"]


def test_user_registered_type_round_trips(tmp_path, scale_type):
    assert "tests.Scale" in replacement_types() and "torch.nn.Conv2d" in replacement_types()
    model, x = cnn(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        scale = Scale(16)
        scale.weight.uniform_(0.5, 2.0)
    replace_module_(model, "bn2", scale)
    torchslim.save(model, tmp_path / "ckpt")
    loaded = torchslim.load(tmp_path / "ckpt", cnn(seed=9))
    assert type(loaded.bn2) is Scale and torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"'tests.Scale' is already registered"):
        register_replacement_type(nn.Softplus, "tests.Scale")


def test_unregistered_user_type_in_a_checkpoint_is_refused(tmp_path, scale_type):
    model = cnn()
    replace_module_(model, "bn2", Scale(16))
    torchslim.save(model, tmp_path / "ckpt")
    del REPLACEMENT_TYPES["tests.Scale"]
    try:
        target = cnn(seed=1)
        snap = snapshot(target)
        with pytest.raises(CheckpointError, match=r"step 1: cannot replace module 'bn2': type 'tests.Scale' is not"):
            torchslim.load(tmp_path / "ckpt", target)
        assert_untouched(target, snap)
    finally:
        register_replacement_type(Scale, "tests.Scale")


def test_a_module_put_by_a_replacement_can_be_replaced_again(tmp_path):
    """Successive replacements of one path replay in order."""
    model, x = cnn(), torch.randn(1, 3, 16, 16)
    replace_module_(model, "fc", nn.Linear(16, 5))
    with torch.no_grad():
        model.fc.weight.normal_()
    replace_module_(model, "bn1", nn.Identity())
    replace_module_(model, "bn1", nn.ReLU())  # the Identity put there is replaced in turn
    torchslim.save(model, tmp_path / "ckpt")
    loaded = torchslim.load(tmp_path / "ckpt", cnn(seed=4))
    assert type(loaded.bn1) is nn.ReLU and torch.equal(loaded(x), model(x))


def test_a_module_swapped_by_hand_is_refused_by_save(tmp_path):
    model = cnn()
    torchslim.prune_(model, torch.randn(1, 3, 16, 16), torchslim.PruneConfig(ratio=0.25))
    model.bn2 = nn.Identity()  # not recorded: the history no longer describes the model
    with pytest.raises(CheckpointError, match=r"'bn2.weight'.*replace_module_"):
        torchslim.save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_removed_indices_of_a_replaced_module_start_over():
    """PruningPlan.removed composes steps per tensor; a replaced module's tensors are new ones."""
    model, x = cnn(), torch.randn(1, 3, 16, 16)
    first = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.25)).plan.removed
    assert "conv1.weight" in first and "bn1.weight" in first
    fold(model, "conv1", "bn1")
    second = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5)).plan.removed
    composed = pruning_history(model).removed
    assert composed["conv1.weight"] == second["conv1.weight"]  # relative to the folded conv, not composed
    assert "bn1.weight" not in composed  # an Identity now: its old removals are gone with it
    assert composed["conv2.weight"][1] == sorted(set(first["conv2.weight"][1]) | set(
        [i for i in range(8) if i not in first["conv2.weight"][1]][j] for j in second["conv2.weight"][1]))


def test_replacements_are_built_in_the_dtype_of_the_model(tmp_path):
    model, x = cnn().double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fold(model, "conv1", "bn1")
    model.conv1.double()
    torchslim.save(model, tmp_path / "ckpt")
    loaded = torchslim.load(tmp_path / "ckpt", cnn(seed=2).double())
    assert loaded.conv1.weight.dtype == torch.float64 and torch.equal(loaded(x), model(x))


def test_a_failure_after_the_swaps_rolls_load_back(folded_checkpoint, monkeypatch):
    """load is transactional: modules swapped in by the replay are swapped back on any error."""
    from torchslim.io import serialization

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure while setting the weights")

    model = cnn(seed=2)
    snap = snapshot(model)
    monkeypatch.setattr(serialization, "_set_weights", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        torchslim.load(folded_checkpoint, model)
    assert_untouched(model, snap)
    assert type(model.bn1) is nn.BatchNorm2d and model.conv1.bias is None


def test_verify_refuses_a_plan_with_replacements_and_checks_the_prunings_since():
    model, x = cnn(), torch.randn(2, 3, 16, 16)
    fold(model, "conv1", "bn1")
    after_fold = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.25))
    with pytest.raises(ValueError, match=r"replaces modules \(step 1: conv1; step 2: bn1\)"):
        torchslim.verify(cnn(), model, x, torchslim.pruning_history(model))
    assert torchslim.verify(after_fold, model, x, result.plan).ok


def test_replacing_several_modules_is_all_or_nothing_and_one_plan_step(tmp_path):
    from torchslim.pruning import replace_modules_

    model = cnn()
    x = torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    unlisted = type("Unlisted", (nn.Linear,), {})(16, 5)
    with pytest.raises(ValueError, match="not an allowed replacement type"):
        replace_modules_(model, {"conv1": good, "fc": unlisted})
    assert model.conv1 is not good and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not pruning_history(model).steps
    with pytest.raises(ValueError, match="lies inside"):
        replace_modules_(model, {"bn1": nn.BatchNorm2d(8), "bn1.weight": nn.Identity()})
    old = replace_modules_(model, {"conv1": good, "fc": nn.Linear(16, 5)})
    assert set(old) == {"conv1", "fc"} and model.conv1 is good
    steps = pruning_history(model).steps
    assert len(steps) == 1 and set(steps[0].replaced) == {"conv1", "fc"}
    torchslim.save(model, tmp_path / "ck")
    assert torch.equal(torchslim.load(tmp_path / "ck", cnn(seed=3))(x), model(x))
