"""Depth pruning: whole blocks dropped, exact against the model with those blocks made the
identity; plans that drop replay through save/load; Hugging Face configs follow."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
import torchvision
from torch import nn

from _checkpoint_edits import rewrite_plan

import torchslim
from torchslim import pruning_history
from torchslim.pruning import PruningError, drop_blocks_, droppable_blocks
from torchslim.pruning.plan import name_after_drops, name_before_drops

transformers = pytest.importorskip("transformers")


class PassThrough(nn.Module):
    """What a dropped block is equivalent to: its first input, whatever else it is called with."""

    def forward(self, x, *args, **kwargs):
        return x


def _with_identities(model: nn.Module, blocks: list[str]) -> nn.Module:
    reference = copy.deepcopy(model)
    for path in blocks:
        container, _, index = path.rpartition(".")
        reference.get_submodule(container)[int(index)] = PassThrough()
    return reference


def _resnet50() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    with torch.no_grad():  # random BN statistics, so blocks differ from one another
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_resnet50_droppable_blocks_are_the_residual_blocks_without_downsampling():
    blocks = droppable_blocks(_resnet50(), torch.randn(1, 3, 64, 64))
    assert blocks == ["layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer2.3", "layer3.1", "layer3.2", "layer3.3",
                      "layer3.4", "layer3.5", "layer4.1", "layer4.2"]


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def test_a_whole_stage_of_identity_shaped_blocks_can_go():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(Residual(8), Residual(8)), Residual(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert droppable_blocks(model, x) == ["1", "2"]  # outermost: the stage, not its blocks
    assert droppable_blocks(model, x, blocks=["1.*"]) == ["1.0", "1.1"]
    reference = _with_identities(model, ["1.0", "1.1"])
    drop_blocks_(model, ["1.1", "1.0"])
    assert len(model[1]) == 0  # an empty Sequential is the identity
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_resnet50_blocks_dropped_equal_identity_and_reload(tmp_path):
    model, x = _resnet50(), torch.randn(2, 3, 64, 64)
    reference = _with_identities(model, ["layer2.1", "layer3.3", "layer3.4"])
    plan, hf_fields = drop_blocks_(model, ["layer3.4", "layer2.1", "layer3.3"])
    assert hf_fields is None and plan.dropped == ["layer3.4", "layer2.1", "layer3.3"]
    assert len(model.layer3) == 4 and len(model.layer2) == 3
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    torchslim.save(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "plan.json").read_text())["format"] == "torchslim.plan/3"
    fresh = torchslim.load(tmp_path / "ckpt", torchvision.models.resnet50().eval())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_planted_identity_blocks_are_found_by_block_influence():
    model, x = _resnet50(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # a bottleneck whose last BN outputs zero is exactly relu(x + 0) = x
        for path in ("layer2.2", "layer4.1"):
            model.get_submodule(path).bn3.weight.zero_()
            model.get_submodule(path).bn3.bias.zero_()
        expected = model(x)
    result = torchslim.prune_depth_(model, x, 2)
    assert sorted(result.dropped) == ["layer2.2", "layer4.1"]
    assert all(result.scores[p] < 1e-12 for p in result.dropped)
    assert min(s for p, s in result.scores.items() if p not in result.dropped) > 1e-4
    assert result.macs_after < result.macs_before
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_user_evaluation_ranks_blocks():
    model, x = _resnet50(), torch.randn(2, 3, 64, 64)
    target = model(x).detach()
    calls = []

    def evaluate(m: nn.Module) -> float:  # higher is better: closeness to the full model's logits
        calls.append(len(m.layer3))
        with torch.no_grad():
            return -float((m(x) - target).pow(2).mean())

    scores = torchslim.pruning.block_importance(model, [x], ["layer3.1", "layer3.2"], importance=evaluate)
    assert calls == [6, 5, 5] and len(model.layer3) == 6  # each removed in turn, then put back
    for path, score in scores.items():
        reduced = _with_identities(model, [path])
        with torch.no_grad():
            assert score == pytest.approx(float((reduced(x) - target).pow(2).mean()))


def test_depth_then_width_pruning_verifies_and_reloads(tmp_path):
    model, x = _resnet50(), torch.randn(2, 3, 64, 64)
    original = copy.deepcopy(model)
    drop_blocks_(model, ["layer1.2", "layer3.1"])
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.3, exact_only=True))
    drop_blocks_(model, ["layer3.2"])  # originally layer3.3
    history = pruning_history(model)
    assert history.dropped == ["layer1.2", "layer3.1", "layer3.3"]
    assert torchslim.verify(original, model, x, history).ok
    torchslim.save(model, tmp_path / "ckpt")
    fresh = torchslim.load(tmp_path / "ckpt", torchvision.models.resnet50().eval())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_bad_drops_leave_the_model_untouched():
    model = _resnet50()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv1' is not an entry of an nn\.ModuleList"):
        drop_blocks_(model, ["layer2.1", "layer1.0.conv1"])
    with pytest.raises(ValueError, match=r"'layer2' .*has no entry '7'"):
        drop_blocks_(model, ["layer1.1", "layer2.7"])
    with pytest.raises(ValueError, match=r"lies inside 'layer1\.1'"):
        drop_blocks_(model, ["layer1.1", "layer1.1.conv1"])
    with pytest.raises(PruningError, match="12 droppable block"):
        torchslim.prune_depth_(model, torch.randn(1, 3, 32, 32), 12)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not pruning_history(model)


def test_a_tampered_drop_is_refused_before_loading(tmp_path):
    model = _resnet50()
    drop_blocks_(model, ["layer2.1"])
    torchslim.save(model, tmp_path / "ckpt")
    rewrite_plan(tmp_path / "ckpt", lambda data: data["steps"][0].update(dropped=["fc.1"]))
    fresh = torchvision.models.resnet50()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(torchslim.CheckpointError, match=r"step 1: 'fc\.1' is not an entry"):
        torchslim.load(tmp_path / "ckpt", fresh)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    rewrite_plan(tmp_path / "ckpt", lambda data: data["steps"][0].update(dropped=["layer2.1", "layer2.1"]))
    with pytest.raises(torchslim.CheckpointError, match="dropped names a block twice"):
        torchslim.load(tmp_path / "ckpt", fresh)
    rewrite_plan(tmp_path / "ckpt", lambda data: data.update(format="torchslim.plan/2"))
    with pytest.raises(torchslim.CheckpointError, match="unknown key"):
        torchslim.load(tmp_path / "ckpt", fresh)


@pytest.mark.parametrize("dropped", [["a.1"], ["a.0", "a.3"], ["a.2.b.0", "a.1"], ["a.1.b.2", "a.3.b.0", "a.0", "c.5"]])
def test_names_after_drops_invert(dropped):
    names = [f"a.{i}.b.{j}.w" for i, j in itertools.product(range(5), range(4))] + [f"c.{i}" for i in range(7)]
    after = {name: name_after_drops(name, dropped) for name in names}
    survivors = [a for a in after.values() if a is not None]
    assert len(set(survivors)) == len(survivors)  # no two names collide
    for name, new in after.items():
        if new is None:
            assert any(name.startswith(d + ".") or name == d for d in dropped)
        else:
            assert name_before_drops(new, dropped) == name
    assert after["a.4.b.3.w"] == f"a.{4 - sum(d.count('.') == 1 and d.startswith('a.') for d in dropped)}.b.3.w"


# -- Hugging Face decoders -------------------------------------------------------------------
def _causal_lm(kind: str, **extra):
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=100, **extra)
    config = transformers.AutoConfig.for_model(kind, **sizes)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


IDS = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_decoder_layers_dropped_equal_identity_and_round_trip(kind, tmp_path):
    model = _causal_lm(kind)
    inputs = ((), {"input_ids": IDS, "use_cache": False})
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    result = torchslim.prune_depth_(model, inputs, 2)
    reference = _with_identities(_causal_lm(kind), result.dropped)
    kept = [i for i in range(4) if f"model.layers.{i}" not in result.dropped]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    if layer_types:
        assert model.config.layer_types == [layer_types[i] for i in kept]
    assert result.hf_config["num_hidden_layers"] == 2
    assert 0.4 < result.macs_ratio < 0.75
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS, use_cache=False).logits, reference(input_ids=IDS, use_cache=False).logits)
    generated = model.generate(IDS[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(generated, reference.generate(IDS[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False))

    model.save_pretrained(tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torchslim.save(model, tmp_path / "ckpt")
    fresh = torchslim.load(tmp_path / "ckpt", _causal_lm(kind))
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        assert torch.equal(back(input_ids=IDS).logits, logits)
        assert torch.equal(fresh(input_ids=IDS).logits, logits)
    assert fresh.config.num_hidden_layers == 2


def test_depth_and_width_pruned_llama_round_trips_through_from_pretrained(tmp_path):
    model = _causal_lm("llama")
    inputs = ((), {"input_ids": IDS, "use_cache": False})
    original = copy.deepcopy(model)
    torchslim.prune_depth_(model, inputs, 1)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    assert result.hf_config and result.hf_config["intermediate_size"] == 48
    assert torchslim.verify(original, model, inputs, pruning_history(model)).ok
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=IDS).logits, model(input_ids=IDS).logits)


# -- command line ----------------------------------------------------------------------------
LLAMA_KWARGS = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 100}


def test_cli_drops_blocks_then_prunes_to_a_target_of_the_original(tmp_path):
    from torchslim.cli import main

    out = tmp_path / "llama"
    assert main(["prune", "hf:llama", "--input", "1,12", "--model-kwargs", json.dumps(LLAMA_KWARGS),
                 "--drop-blocks", "1", "--blocks", "*layers.*", "--target-macs", "0.5", "--exact-only",
                 "--no-latency-table", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["result"]["depth"]["dropped"]) == 1 and report["exact"]
    macs_before, macs_after = report["macs"]
    assert 0.48 <= macs_after / macs_before <= 0.5  # the target is of the original, blocks included
    model = torchslim.load(out, _base_llama())
    assert model.config.num_hidden_layers == 3 and len(model.layers) == 3
    assert main(["prune", str(out), "--input", "1,12", "--drop-blocks", "1", "--repeats", "1",
                 "--out", str(tmp_path / "again")]) == 0  # a checkpoint DIR is a model: its plan replays first
    assert torchslim.load(tmp_path / "again", _base_llama()).config.num_hidden_layers == 2


def _base_llama() -> nn.Module:  # what the command's hf:llama builds
    return transformers.AutoModel.from_config(transformers.AutoConfig.for_model("llama", **LLAMA_KWARGS))


def test_cli_refuses_blocks_without_drop_blocks(tmp_path, capsys):
    from torchslim.cli import main

    assert main(["prune", "torchvision:resnet18", "--input", "1,3,32,32", "--blocks", "layer1.*",
                 "--out", str(tmp_path)]) != 0
    assert "--blocks says which blocks --drop-blocks may remove" in capsys.readouterr().err
