"""Mixture-of-experts layers: fused expert tensors (transformers 5) and per-expert modules."""
from __future__ import annotations

import copy

import pytest
import torch

import torchslim
from archs import ModuleListMoE, tiny_moe_causal_lm, tiny_moe_config, zero_expert_units_

transformers = pytest.importorskip("transformers")

def _causal_lm(kind: str, implementation: str = "grouped_mm"):
    model = tiny_moe_causal_lm(tiny_moe_config(kind), implementation)
    return model, ((), {"input_ids": torch.randint(1, 100, (2, 8)), "use_cache": False})


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_fused_experts_prune_exactly_to_half_the_macs(implementation):
    model, inputs = _causal_lm("mixtral", implementation)
    original = copy.deepcopy(model)
    before = model.model.layers[0].mlp.experts.gate_up_proj.shape
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(target_macs=0.5, exact_only=True))
    assert abs(result.macs_after / result.macs_before - 0.5) < 0.02
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[1] < before[1]  # the experts' hidden units, not only attention
    assert experts.gate_up_proj.shape[1] == 2 * experts.down_proj.shape[2]
    assert torchslim.verify(original, model, inputs, result.plan).ok


def test_qwen2_moe_prunes_experts_and_the_shared_expert():
    model, inputs = _causal_lm("qwen2_moe")
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    mlp = model.model.layers[0].mlp
    assert tuple(mlp.experts.down_proj.shape) == (4, 64, 32)
    assert mlp.shared_expert.up_proj.out_features == 64 and mlp.shared_expert_gate.out_features == 1
    assert torchslim.verify(original, model, inputs, result.plan).ok


def test_uniform_expert_pruning_round_trips_through_save_pretrained(tmp_path):
    model, inputs = _causal_lm("mixtral")
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    assert result.hf_config and result.hf_config["intermediate_size"] == 64
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(**inputs[1]).logits, model(**inputs[1]).logits)
    assert model.generate(inputs[1]["input_ids"][:1], max_new_tokens=3, min_new_tokens=3,
                          do_sample=False).shape == (1, 11)


DEAD_UNITS = [3, 17, 40, 41]


def test_planted_dead_expert_units_are_exactly_the_ones_removed():
    model, inputs = _causal_lm("mixtral")
    zero_expert_units_(model, DEAD_UNITS)
    original = copy.deepcopy(model)
    config = torchslim.PruneConfig(ratio=len(DEAD_UNITS) / 128, exact_only=True, op_names=["*experts*"])
    result = torchslim.prune_(model, inputs, config)
    for layer, before in zip(model.model.layers, original.model.layers):
        kept = [u for u in range(128) if u not in DEAD_UNITS]
        torch.testing.assert_close(layer.mlp.experts.down_proj, before.mlp.experts.down_proj[:, :, kept], rtol=0, atol=0)
    with torch.no_grad():  # the same routing: the dead units never contributed, so outputs are unchanged
        torch.testing.assert_close(model(**inputs[1]).logits, original(**inputs[1]).logits)
    assert torchslim.verify(original, model, inputs, result.plan).ok


def test_per_expert_modules_are_each_their_own_group():
    torch.manual_seed(0)
    model = ModuleListMoE().eval()
    x = torch.randn(64, 16)
    assert len((model.router(x).argmax(-1)).unique()) == 4  # every expert runs on the example
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratios={"experts.0.up": 0.75, "experts.2.up": 0.25},
                                                               ratio=0.0, exact_only=True))
    assert [e.up.out_features for e in model.experts] == [8, 32, 24, 32]
    assert torchslim.verify(original, model, x, result.plan).ok
