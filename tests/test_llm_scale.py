"""benchmarks/llm_scale.py on its tiny config, so that the script cannot rot: the model built
on the meta device, pruned to half its MACs alike in every layer, saved both ways and rebuilt."""
from __future__ import annotations

import copy

import pytest
import torch

import torchslim
from _benchmarks import load_benchmark

transformers = pytest.importorskip("transformers")


def test_tiny_config_prunes_to_half_the_macs_and_reloads(tmp_path):
    bench = load_benchmark("llm_scale")
    row = bench.run("tiny", tmp_path, keep=True)
    assert 0.45 <= row["macs_ratio"] <= 0.5
    assert row["reload_equal"] is True  # from_pretrained rebuilt the pruned model: equal logits
    assert row["hf_config"] == {"num_attention_heads": 4, "num_key_value_heads": 1,
                                "intermediate_size": row["ffn_planned"]}
    assert row["ffn_after"] == row["ffn_planned"] and row["ffn_planned"] % bench.UNIT["tiny"] == 0
    assert row["params_after"] < row["params_before"] and row["max_abs_error"] is not None
    assert {"build", "prune", "save", "save_pretrained", "from_pretrained", "  trace + graph", "  importance",
            "  select", "  zeroed reference", "  apply", "  pruned forward", "  sync hf config"} == set(row["phases"])
    steps = [p for name, p in row["phases"].items() if name.startswith("  ")]
    assert sum(p["seconds"] for p in steps) <= row["prune_s"] and row["phases"]["  apply"]["calls"] == 1
    assert max(p["peak_gib"] for name, p in row["phases"].items() if name != "from_pretrained") == row["peak_rss_gib"]
    assert row["within_bound"] and row["reload_peak_gib"] > 0
    assert row["baseline_rss_gib"] < row["predicted_gib"] < row["bound_gib"] and row["graph_elements"] > 0
    # the torchslim checkpoint loads into a freshly built original
    fresh = bench.build("tiny")
    torchslim.load(tmp_path / "tiny_torchslim", fresh)
    inputs = bench.example_inputs("tiny")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "tiny_hf", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(fresh(*inputs[0], **inputs[1]).logits, back(*inputs[0], **inputs[1]).logits)


def test_the_built_model_is_random_tied_and_prunes_exactly():
    bench = load_benchmark("llm_scale")
    model = bench.build("tiny")
    weights = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    assert all(p.dtype == torch.bfloat16 and p.float().std() > 0.01 for p in weights)
    rows = model.model.layers[0].mlp.up_proj.weight
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]  # no two rows alike: no ties in the ranking
    original = copy.deepcopy(model)
    inputs = bench.example_inputs("tiny")
    config, kept = bench.uniform_config("tiny")
    result = torchslim.prune_(model, inputs, config)
    assert torchslim.verify(original, model, inputs, result.plan).ok
    assert model.model.layers[1].mlp.up_proj.out_features == kept


def test_tied_embeddings_stay_tied_after_to_empty(monkeypatch):
    bench = load_benchmark("llm_scale")
    monkeypatch.setitem(bench.CONFIGS, "tiny", {**bench.CONFIGS["tiny"], "tie_word_embeddings": True})
    model = bench.build("tiny")
    assert model.lm_head.weight is model.model.embed_tokens.weight
