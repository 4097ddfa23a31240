"""Transformers from configs (random init): heads and FFN units pruned exactly."""
from __future__ import annotations

import copy

import pytest
import torch

import torchslim

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=128),
    "t5": dict(d_model=64, num_layers=2, num_heads=4, d_ff=128, d_kv=16),
    "vit": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8),
}


def _build(kind: str):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(kind, **CONFIGS[kind])
    model = transformers.AutoModel.from_config(config).eval()
    if kind == "vit":
        return model, torch.randn(1, 3, 32, 32)
    ids = torch.randint(0, 100, (1, 8))
    if kind == "t5":
        return model, ((), {"input_ids": ids, "decoder_input_ids": ids[:, :4]})
    return model, ids


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_transformer_prunes_exactly(kind):
    model, inputs = _build(kind)
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    assert result.plan and result.params_after < result.params_before
    assert torchslim.verify(original, model, inputs, result.plan).ok


def test_llama_gqa_prunes_whole_kv_groups():
    model, ids = _build("llama")
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    attn = model.layers[0].self_attn
    head_dim = original.layers[0].self_attn.head_dim
    q_heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    assert (q_heads, kv_heads) == (4, 1)  # one of two kv groups, with its 4 query heads
    assert attn.o_proj.in_features == q_heads * head_dim
    assert torchslim.verify(original, model, ids, result.plan).ok


def test_bert_heads_follow_attributes():
    model, ids = _build("bert")
    torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    attn = model.encoder.layer[0].attention.self
    assert attn.query.out_features == attn.num_attention_heads * attn.attention_head_size == attn.all_head_size
    assert attn.num_attention_heads == 2


def test_round_to_counts_channels_so_heads_are_not_rounded_up_to_eight_heads():
    """round_to=8 keeps a multiple of 8 channels: a head of 16 dims already is one, so BERT's 4
    heads go to 2 at ratio 0.5 (rounding head counts to 8 would keep all 4), while the FFN's
    plain channels land on multiples of 8."""
    model, ids = _build("bert")
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5, exact_only=True, round_to=8))
    layer, before = model.encoder.layer[0], original.encoder.layer[0]
    assert before.attention.self.num_attention_heads == 4 and layer.attention.self.attention_head_size == 16
    assert layer.attention.self.num_attention_heads == 2
    assert layer.intermediate.dense.out_features % 8 == 0
    assert layer.intermediate.dense.out_features < before.intermediate.dense.out_features
    assert torchslim.verify(original, model, ids, result.plan).ok


@pytest.mark.parametrize("kind, exclude", [("llama", ()), ("gpt2", ("*attn*",)), ("bert", ("*attention*",))])
def test_uniform_pruning_round_trips_through_save_pretrained(kind, exclude, tmp_path):
    """The HF config follows the pruned widths, so from_pretrained rebuilds the pruned model."""
    model, inputs = _build(kind)
    before = model.config.to_dict()
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, exact_only=True, exclude=exclude))
    assert result.hf_config, result.hf_config
    assert all(before.get(k) != v for k, v in result.hf_config.items())
    model.save_pretrained(tmp_path)
    back = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(inputs).last_hidden_state, model(inputs).last_hidden_state)
    # torchslim.load into a fresh original syncs the config the same way
    fresh, _ = _build(kind)
    torchslim.save(model, tmp_path / "ck", result)
    torchslim.load(tmp_path / "ck", fresh)
    assert {k: getattr(fresh.config, k) for k in result.hf_config} == result.hf_config


def test_config_that_cannot_describe_the_pruned_model_is_left_alone():
    """BERT derives head size as hidden_size // num_heads: pruned heads have no config."""
    model, ids = _build("bert")
    before = model.config.to_dict()
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    assert model.encoder.layer[0].attention.self.num_attention_heads == 2
    assert result.hf_config is None and model.config.to_dict() == before


# today's architectures: fused qkv/gate_up (Phi-3), experts (Mixtral, Qwen2-MoE), encoder-decoder with
# cross-attention (T5), QK-norm (Qwen3), soft-capped sliding-window attention (Gemma 2)
ZOO = {
    "phi3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=128, vocab_size=100, pad_token_id=0),
    "t5": dict(d_model=64, num_layers=2, num_heads=4, d_ff=128, d_kv=16, vocab_size=100),
    "mixtral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, vocab_size=100),
    "qwen2_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                      num_experts=4, num_experts_per_tok=2, vocab_size=100),
    "qwen3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=128, head_dim=16, vocab_size=100),
    "gemma2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=128, head_dim=16, vocab_size=100),
}


def _build_lm(kind: str):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(kind, **ZOO[kind])
    auto = transformers.AutoModelForSeq2SeqLM if kind == "t5" else transformers.AutoModelForCausalLM
    model = auto.from_config(config).eval()
    ids = torch.randint(1, 100, (1, 8))
    extra = {"decoder_input_ids": ids[:, :4]} if kind == "t5" else {"use_cache": False}
    return model, ((), {"input_ids": ids, **extra})


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs[0], **inputs[1]).logits


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_todays_transformers_reach_half_the_macs_exactly_and_round_trip(kind, tmp_path):
    model, inputs = _build_lm(kind)
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(target_macs=0.5, exact_only=True))
    assert 0.48 <= result.macs_after / result.macs_before <= 0.5
    assert torchslim.verify(original, model, inputs, result.plan).ok
    torchslim.save(model, tmp_path / "ck", result)
    fresh, _ = _build_lm(kind)
    torchslim.load(tmp_path / "ck", fresh)
    torch.testing.assert_close(_logits(fresh.eval(), inputs), _logits(model, inputs), rtol=0, atol=0)
    ids = inputs[1]["input_ids"]
    start = {"decoder_start_token_id": 0} if kind == "t5" else {}
    generated = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, **start)
    assert generated.shape[-1] == (4 if kind == "t5" else 11)


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_todays_transformers_pruned_alike_round_trip_through_save_pretrained(kind, tmp_path):
    model, inputs = _build_lm(kind)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    assert result.hf_config, f"{kind}: no config describes the pruned model"
    model.save_pretrained(tmp_path)
    auto = transformers.AutoModelForSeq2SeqLM if kind == "t5" else transformers.AutoModelForCausalLM
    back = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(back, inputs), _logits(model, inputs), rtol=0, atol=0)


def test_phi3_fused_qkv_keeps_whole_kv_groups_and_its_own_head_counts():
    model, inputs = _build_lm("phi3")
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratios={"model.layers.0.self_attn.qkv_proj": 0.5},
                                                                   ratio=0.0, exact_only=True))
    attn, other = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    head_dim = attn.head_dim
    assert (attn.config.num_attention_heads, attn.config.num_key_value_heads) == (4, 2)
    assert attn.qkv_proj.out_features == (4 + 2 * 2) * head_dim and attn.o_proj.in_features == 4 * head_dim
    assert (other.config.num_attention_heads, other.config.num_key_value_heads) == (8, 4)  # the other layer keeps all
    assert model.config.num_attention_heads == 8  # the model's config is not one layer's
    assert torchslim.verify(original, model, inputs, result.plan).ok
