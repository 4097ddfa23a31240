"""Pruned checkpoints (save / load into a fresh original) and ONNX export."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from _checkpoint_edits import fix_hashes, rewrite_plan

import torchslim
from torchslim.io import CheckpointError, export_onnx, load, save

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs: one thread is fastest, and OpenMP's spinning threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.ln = nn.LayerNorm(32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.ln2 = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.ln(self.proj(x))
        a, _ = self.mha(h, h, h, need_weights=False)
        h = h + a
        h = self.ln2(h + self.ffn(h))
        return self.head(h.mean(1))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 24, 1))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.body(h))
        return self.fc(self.dw(h).mean((2, 3)))


class TiedLM(nn.Module):
    """Embedding and output head share one weight (safetensors refuses shared storage)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.mlp(h))


@torch.no_grad()
def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _build(name: str, seed: int = 0):
    """A freshly built original (seeded: its random init differs from the checkpoint's when seed differs)."""
    torch.manual_seed(seed)
    if name == "resnet18":
        return _randomize_bn(torchvision.models.resnet18(num_classes=10)), torch.randn(1, 3, 32, 32)
    if name == "mobilenet_v2":
        return _randomize_bn(torchvision.models.mobilenet_v2(num_classes=10)), torch.randn(1, 3, 32, 32)
    if name == "attention":
        return AttentionBlock().eval(), torch.randn(2, 5, 16)
    if name == "small_resnet":
        return _randomize_bn(SmallResNet()), torch.randn(1, 3, 16, 16)
    if name == "tied":
        return TiedLM().eval(), torch.randint(0, 50, (2, 7))
    raise KeyError(name)


class Pruned:
    def __init__(self, name: str, times: int = 1):
        self.name = name
        self.model, self.inputs = _build(name, seed=0)
        self.original = copy.deepcopy(self.model)
        plan = torchslim.PruningPlan()
        for _ in range(times):
            plan = plan.extend(torchslim.prune_(self.model, self.inputs, torchslim.PruneConfig(ratio=0.5 if times == 1 else 0.3)).plan)
        self.plan = plan
        self._fresh: dict[int, nn.Module] = {}

    def fresh(self, seed: int = 1) -> nn.Module:
        if seed not in self._fresh:
            self._fresh[seed] = _build(self.name, seed=seed)[0]
        return copy.deepcopy(self._fresh[seed])


_CACHE: dict[tuple[str, int], Pruned] = {}


def pruned(name: str, times: int = 1) -> Pruned:
    if (name, times) not in _CACHE:
        _CACHE[(name, times)] = Pruned(name, times)
    return _CACHE[(name, times)]


def _snapshot(model: nn.Module):
    tensors = {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    attrs = {name: {k: v for k, v in vars(m).items() if isinstance(v, (int, float, tuple, str, bool))}
             for name, m in model.named_modules()}
    return tensors, attrs


def _assert_untouched(model: nn.Module, snapshot) -> None:
    tensors, attrs = _snapshot(model)
    before_tensors, before_attrs = snapshot
    assert tensors.keys() == before_tensors.keys()
    for key, (ident, value) in before_tensors.items():
        assert tensors[key][0] == ident, f"{key} was replaced"
        assert torch.equal(tensors[key][1], value), f"{key} changed"
    assert attrs == before_attrs


# ---------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,times", [("resnet18", 1), ("mobilenet_v2", 1), ("attention", 1), ("small_resnet", 2)])
def test_round_trip_equals_pruned(tmp_path, name, times):
    p = pruned(name, times)
    assert p.plan and len(p.plan.steps) == times
    directory = save(p.model, tmp_path / "ckpt", p.plan, metadata={"run": name, "lr": 0.1})
    assert sorted(f.name for f in directory.iterdir()) == ["meta.json", "model.safetensors", "plan.json"]
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["metadata"] == {"run": name, "lr": 0.1}
    assert meta["torch_version"] == torch.__version__ and meta["torchslim_version"] == torchslim.__version__
    assert meta["model_class"].endswith(type(p.model).__qualname__)
    assert meta["num_parameters"] == sum(q.numel() for q in p.model.parameters())
    assert meta["weights_sha256"] == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()

    fresh = p.fresh(seed=1)
    assert load(directory, fresh) is fresh
    with torch.no_grad():
        assert torch.equal(fresh(p.inputs), p.model(p.inputs))
    assert fresh.state_dict().keys() == p.model.state_dict().keys()
    for key, value in p.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # module attributes follow (the model is usable beyond these inputs)
    for (n1, m1), (n2, m2) in zip(p.model.named_modules(), fresh.named_modules()):
        assert n1 == n2 and m1.extra_repr() == m2.extra_repr(), n1
    exact = torchslim.verify(p.original, p.model, p.inputs, p.plan).ok  # LayerNorm groups are not exact
    assert torchslim.verify(p.original, fresh, p.inputs, p.plan).ok == exact


def test_twice_pruned_plan_is_stored_as_two_successive_steps(tmp_path):
    p = pruned("small_resnet", 2)
    save(p.model, tmp_path, p.plan)
    steps = torchslim.PruningPlan.from_dict(json.loads((tmp_path / "plan.json").read_text())).steps
    assert len(steps) == 2
    first, second = steps
    shared = set(first.shapes) & set(second.shapes)
    assert shared
    for name in shared:  # the second step starts from the first step's result
        expected = list(first.shapes[name])
        for dim, gone in first.removed.get(name, {}).items():
            expected[dim] -= len(gone)
        assert second.shapes[name] == expected, name


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model, ids = _build("tied")
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5))
    save(model, tmp_path, result.plan)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["aliases"] == {"head.weight": "emb.weight"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "head.weight" not in f.keys()
    fresh = _load_into_fresh(tmp_path, "tied", model, ids)
    assert fresh.head.weight is fresh.emb.weight


def test_unpruned_model_round_trips_with_empty_plan(tmp_path):
    model, x = _build("small_resnet")
    save(model, tmp_path, None)
    _load_into_fresh(tmp_path, "small_resnet", model, x)


def test_prune_result_is_accepted_as_plan(tmp_path):
    model, x = _build("attention")
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    save(model, tmp_path, result)
    _load_into_fresh(tmp_path, "attention", model, x)


def _load_into_fresh(directory, name: str, saved_model: nn.Module, inputs) -> nn.Module:
    """Load ``directory`` into a differently seeded fresh ``name``; it must compute what was saved."""
    fresh = _build(name, seed=7)[0]
    load(directory, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(inputs), saved_model(inputs))
    return fresh


def test_bert_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")

    def build(seed):
        torch.manual_seed(seed)
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128)
        return transformers.BertModel(config).eval()

    model = build(0)
    ids = torch.randint(0, 100, (1, 8))
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5))
    assert result.plan
    save(model, tmp_path, result.plan)
    fresh = build(1)
    load(tmp_path, fresh)
    assert fresh.encoder.layer[0].attention.self.num_attention_heads == \
        model.encoder.layer[0].attention.self.num_attention_heads
    with torch.no_grad():
        expected, actual = model(ids), fresh(ids)
    assert torch.equal(actual.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(actual.pooler_output, expected.pooler_output)


# ---------------------------------------------------------------------------------------
# errors: clear, and the model left untouched
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    p = pruned("resnet18")
    return save(p.model, tmp_path_factory.mktemp("ckpt") / "resnet18", p.plan)


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target




def _rewrite_weights(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))
    fix_hashes(directory)


def _rewrite_meta(directory: Path, edit) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    edit(meta)
    (directory / "meta.json").write_text(json.dumps(meta))


def _set_first_index(plan: dict, value) -> None:
    plan["steps"][0]["removed"]["conv1.weight"]["0"][0] = value


def _first_conv_key(data):
    return next(k for k in data["steps"][0]["removed"] if k.endswith("conv1.weight"))


CORRUPTIONS = {
    "missing plan": (lambda d: (d / "plan.json").unlink(), "has no plan.json"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    "meta not json": (lambda d: (d / "meta.json").write_text("{oops"), "meta.json: not valid JSON"),
    "meta wrong format": (lambda d: (d / "meta.json").write_text(json.dumps({"format": "other"})), "not a torchslim checkpoint"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                          "model.safetensors: sha256 does not match"),
    "truncated weights, hash fixed": (
        lambda d: ((d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), fix_hashes(d)),
        "cannot be read as safetensors"),
    "flipped byte in weights": (
        lambda d: (d / "model.safetensors").write_bytes(
            (lambda b: b[:-10] + bytes([b[-10] ^ 1]) + b[-9:])((d / "model.safetensors").read_bytes())),
        "sha256 does not match"),
    "tampered plan": (lambda d: (d / "plan.json").write_text((d / "plan.json").read_text().replace("[", "[0, ", 1)),
                      "plan.json: sha256 does not match"),
    "plan not json, hash fixed": (lambda d: ((d / "plan.json").write_text("nope"), fix_hashes(d)), "plan.json: not valid JSON"),
    "plan format key": (lambda d: rewrite_plan(d, lambda p: p.update(format="x")),
                        "plan.json: 'format' must be 'torchslim.plan/1', got 'x'"),
    # plan.json's structure is checked before it is used: the file, key and value at fault are named
    "plan index is a float": (lambda d: rewrite_plan(d, lambda p: _set_first_index(p, 1.5)),
                              r"plan.json: steps\[0\].removed\['conv1.weight'\]\['0'\]\[0\] is 1.5; removed indices "
                              "must be non-negative integers"),
    "plan index is true": (lambda d: rewrite_plan(d, lambda p: _set_first_index(p, True)),
                           r"plan.json: steps\[0\].removed\['conv1.weight'\]\['0'\]\[0\] is true"),
    "plan index is a string": (lambda d: rewrite_plan(d, lambda p: _set_first_index(p, "3")),
                               r"plan.json: steps\[0\].removed\['conv1.weight'\]\['0'\]\[0\] is \"3\""),
    "plan index is negative": (lambda d: rewrite_plan(d, lambda p: _set_first_index(p, -1)), r"\[0\] is -1"),
    "plan steps is an object": (lambda d: rewrite_plan(d, lambda p: p.update(steps={})),
                                "plan.json: 'steps' must be a list of steps, got an object {}"),
    "plan without steps": (lambda d: rewrite_plan(d, lambda p: p.pop("steps")), "plan.json: 'steps' must be a list"),
    "plan step is a list": (lambda d: rewrite_plan(d, lambda p: p["steps"].__setitem__(0, [])),
                            r"plan.json: steps\[0\] must be an object"),
    "plan removed is a list": (lambda d: rewrite_plan(d, lambda p: p["steps"][0].update(removed=[])),
                               r"plan.json: steps\[0\].removed must be an object, got a list"),
    "plan dim is not a number": (
        lambda d: rewrite_plan(d, lambda p: p["steps"][0]["removed"]["fc.weight"].update({"x": [0]})),
        r"plan.json: steps\[0\].removed\['fc.weight'\] has dim 'x'"),
    "plan size is a float": (
        lambda d: rewrite_plan(d, lambda p: p["steps"][0]["shapes"].update({"conv1.weight": [64.0, 3, 7, 7]})),
        r"plan.json: steps\[0\].shapes\['conv1.weight'\]\[0\] is 64.0; sizes must be non-negative integers"),
    "meta hash is a number": (lambda d: _rewrite_meta(d, lambda m: m.update(weights_sha256=12345)),
                              "meta.json: 'weights_sha256' must be a sha256 hex digest \\(64 hex digits\\), got 12345"),
    "meta hash missing": (lambda d: _rewrite_meta(d, lambda m: m.pop("plan_sha256")), "meta.json: missing 'plan_sha256'"),
    "meta aliases not names": (lambda d: _rewrite_meta(d, lambda m: m.update(aliases={"a": 1})),
                               "meta.json: 'aliases' must be an object mapping"),
    "missing meta": (lambda d: (d / "meta.json").unlink(), "has no meta.json"),
    "meta is a symlink loop": (lambda d: ((d / "meta.json").unlink(), (d / "meta.json").symlink_to("meta.json")),
                               "meta.json is a symbolic link loop"),
    "weights is a dangling link": (
        lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").symlink_to(d / "gone")),
        "model.safetensors is a symbolic link to .*gone, which does not exist"),
    "plan is a directory": (lambda d: ((d / "plan.json").unlink(), (d / "plan.json").mkdir()),
                            "plan.json is a directory, not a file"),
    "plan unknown name": (lambda d: rewrite_plan(d, lambda p: p["steps"][0]["shapes"].update({"nope.weight": [3]})),
                          "'nope.weight', which the model"),
    "plan wrong shape": (lambda d: rewrite_plan(d, lambda p: p["steps"][0]["shapes"].update({"conv1.weight": [65, 3, 7, 7]})),
                         "'conv1.weight' has shape \\[64, 3, 7, 7\\] in the model, the plan expects \\[65"),
    "plan index out of range": (
        lambda d: rewrite_plan(d, lambda p: p["steps"][0]["removed"][_first_conv_key(p)]["0"].append(10_000)),
        "out of range"),
    "plan removes other indices": (  # same count, but then the weights no longer fit: one more removed
        lambda d: rewrite_plan(d, lambda p: p["steps"][0]["removed"]["fc.weight"].update({"0": [0]})),
        "model.safetensors: 'fc.weight' has shape \\[10, 256\\], the model after the plan has \\[9, 256\\]"),
    "plan sets a method": (
        lambda d: rewrite_plan(d, lambda p: p["steps"][0]["attributes"].update({"conv1": {"forward": 3}})),
        "'conv1.forward' cannot be set"),
    "plan sets unknown module": (
        lambda d: rewrite_plan(d, lambda p: p["steps"][0]["attributes"].update({"nope": {"x": 3}})),
        "module 'nope'"),
    "plan sets a size to a string": (
        lambda d: rewrite_plan(d, lambda p: p["steps"][0]["attributes"].update({"conv1": {"out_channels": "many"}})),
        "different kind of value"),
    "weights wrong shape": (lambda d: _rewrite_weights(d, lambda t: t.update({"fc.bias": torch.zeros(11)})),
                            "'fc.bias' has shape \\[11\\]"),
    "weights missing key": (lambda d: _rewrite_weights(d, lambda t: t.pop("fc.bias")), "missing key\\(s\\) 'fc.bias'"),
    "weights extra key": (lambda d: _rewrite_weights(d, lambda t: t.update({"extra": torch.zeros(1)})),
                          "unexpected key\\(s\\) 'extra'"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_and_model_untouched(checkpoint, tmp_path, case):
    corrupt, message = CORRUPTIONS[case]
    directory = _copy(checkpoint, tmp_path)
    corrupt(directory)
    fresh = pruned("resnet18").fresh()
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        load(directory, fresh)
    _assert_untouched(fresh, before)


@pytest.mark.parametrize("other,message", [
    ("mobilenet_v2", "which the model .*MobileNetV2.* saved from .*ResNet"),
    ("resnet34", "missing key\\(s\\) 'layer1.2"),
])
def test_wrong_model_class_is_refused(checkpoint, other, message):
    model = _randomize_bn(getattr(torchvision.models, other)(num_classes=10))
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        load(checkpoint, model)
    _assert_untouched(model, before)


def test_loading_into_an_already_pruned_model_is_refused(checkpoint):
    model = copy.deepcopy(pruned("resnet18").model)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match="is the model freshly built and unpruned"):
        load(checkpoint, model)
    _assert_untouched(model, before)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nothing", nn.Linear(2, 2))


def test_directory_that_is_a_symlink_loop(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(CheckpointError, match=r"checkpoint directory .*loop is a symbolic link loop"):
        load(tmp_path / "loop", nn.Linear(2, 2))


def test_failure_midway_rolls_back(checkpoint, monkeypatch):
    from torchslim.io import serialization

    real = serialization._set_weights

    def explode(model, state, aliases, tx):
        real(model, state, aliases, tx)  # the plan is replayed and every weight set...
        raise RuntimeError("disk on fire")  # ...then something fails

    monkeypatch.setattr(serialization, "_set_weights", explode)
    fresh = pruned("resnet18").fresh()
    before = _snapshot(fresh)
    with pytest.raises(RuntimeError, match="disk on fire"):
        load(checkpoint, fresh)
    _assert_untouched(fresh, before)


def test_save_refuses_a_plan_of_another_model(tmp_path):
    p = pruned("resnet18")
    with pytest.raises(CheckpointError, match="the plan"):
        save(p.fresh(), tmp_path, p.plan)  # an unpruned model with a pruned plan
    assert not (tmp_path / "meta.json").exists()
    with pytest.raises(CheckpointError, match="metadata is not JSON"):
        save(p.model, tmp_path / "x", p.plan, metadata={"f": object()})


def test_no_pickle_in_checkpoint(checkpoint):
    for file in checkpoint.iterdir():
        assert not file.read_bytes().startswith(b"\x80"), file  # pickle protocol 2+ header


# ---------------------------------------------------------------------------------------
# pruning history: save(model, path) without the plan
# ---------------------------------------------------------------------------------------
def test_save_without_the_plan_uses_the_models_history(tmp_path):
    model, x = _build("small_resnet")
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    save(model, tmp_path)  # no result passed: the model knows what was removed
    steps = torchslim.PruningPlan.from_dict(json.loads((tmp_path / "plan.json").read_text())).steps
    assert len(steps) == 1 and steps[0].removed
    _load_into_fresh(tmp_path, "small_resnet", model, x)


def test_history_accumulates_and_survives_deepcopy_state_dict_and_torch_save(tmp_path):
    model, x = _build("small_resnet")
    keys = list(model.state_dict())
    first = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.3))
    second = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.3))
    assert torchslim.pruning_history(model).steps == first.plan.steps + second.plan.steps
    assert list(model.state_dict()) == keys  # not a tensor, not in the state_dict
    copied = copy.deepcopy(model)
    assert torchslim.pruning_history(copied).steps == first.plan.steps + second.plan.steps
    torch.save(copied, tmp_path / "whole.pt")
    unpickled = torch.load(tmp_path / "whole.pt", weights_only=False)
    save(unpickled, tmp_path / "ckpt")
    _load_into_fresh(tmp_path / "ckpt", "small_resnet", model, x)


def test_load_then_prune_again_then_save_replays_both_steps(tmp_path):
    model, x = _build("small_resnet")
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.3))
    save(model, tmp_path / "one")
    loaded = _load_into_fresh(tmp_path / "one", "small_resnet", model, x)
    assert len(torchslim.pruning_history(loaded).steps) == 1
    torchslim.prune_(loaded, x, torchslim.PruneConfig(ratio=0.3))
    save(loaded, tmp_path / "two")  # the checkpoint's plan, then the new pruning
    assert len(json.loads((tmp_path / "two" / "plan.json").read_text())["steps"]) == 2
    twice = _load_into_fresh(tmp_path / "two", "small_resnet", loaded, x)
    assert len(torchslim.pruning_history(twice).steps) == 2


def test_save_refuses_a_model_changed_by_hand_after_pruning(tmp_path):
    model, x = _build("small_resnet")
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exclude=["fc"]))
    model.fc = nn.Linear(model.fc.in_features, 3)  # a new head, not in the history
    with pytest.raises(CheckpointError, match=r"'fc\.weight' has shape \[3, \d+\], its last pruning left it at \[5, "):
        save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_save_refuses_a_history_broken_by_hand_between_two_prunings(tmp_path):
    model, x = _build("small_resnet")
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.3, exclude=["fc"]))
    model.fc = nn.Linear(model.fc.in_features, 3)  # by hand: a smaller head
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.3, exclude=["fc"]))
    with pytest.raises(CheckpointError, match=r"'fc\.weight'.*changed by hand"):
        save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_pruned_model_with_history_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    model, x = _build("small_resnet")
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    assert export_onnx(model, x, tmp_path / "m.onnx").ok


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_onnx_export_matches_onnxruntime(tmp_path, name):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    p = pruned(name)
    p.model.train()  # exported in eval mode, flags restored
    report = export_onnx(p.model, p.inputs, tmp_path / f"{name}.onnx")
    assert p.model.training
    p.model.eval()
    assert report.ok and report.checked and report.outputs == 1
    assert report.max_abs_error < 1e-4
    assert report.file_bytes == (tmp_path / f"{name}.onnx").stat().st_size
    assert report.opset and report.exporter in ("torchscript", "dynamo")
    import onnx

    proto = onnx.load(str(tmp_path / f"{name}.onnx"))
    onnx.checker.check_model(proto)
    # the pruned widths are what was exported: fewer weights than the original's export
    assert report.file_bytes < 4 * sum(q.numel() for q in p.original.parameters())


def test_onnx_export_with_kwargs_and_no_check(tmp_path):
    pytest.importorskip("onnxruntime")

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, *, y):
            return self.fc(x) * y, x.sum()

    model = Scaled()
    inputs = ((torch.randn(2, 4),), {"y": torch.randn(2, 3)})
    report = export_onnx(model, inputs, tmp_path / "s.onnx", opset=17)
    assert report.ok and report.outputs == 2 and report.opset == 17
    unchecked = export_onnx(model, inputs, tmp_path / "u.onnx", check=False)
    assert not unchecked.checked and unchecked.ok is None and unchecked.max_abs_error is None


def test_onnx_missing_onnxruntime_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ImportError, match=r"onnxruntime is needed.*torchslim\[onnx\]"):
        export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_overwrite_and_load_from_a_file_path(tmp_path):
    model, x = _build("attention")
    save(model, tmp_path, None)  # an earlier checkpoint in the same directory is replaced whole
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    save(model, tmp_path, result.plan)
    fresh = _build("attention", seed=4)[0]
    load(tmp_path / "meta.json", fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["meta.json", "model.safetensors", "plan.json"]
