"""Hugging Face decoders, pruned, exported to ONNX with and without their key/value cache."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

DECODERS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=100),
    "qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=100),
}


def _pruned_decoder(kind: str):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(kind, **DECODERS[kind])
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, 100, (1, 8))
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(target_macs=0.6, exact_only=True))
    assert result.macs_after < 0.7 * result.macs_before
    return model, ids


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_pruned_decoder_exports_without_cache(kind, tmp_path):
    model, ids = _pruned_decoder(kind)
    report = torchslim.export_onnx(model, ids, tmp_path / "m.onnx")  # use_cache=False is implied
    assert report.ok and report.outputs == 1 and report.max_abs_error < 1e-4


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_pruned_decoder_exports_one_generation_step_with_its_cache(kind, tmp_path):
    import onnxruntime as ort

    model, ids = _pruned_decoder(kind)
    report = torchslim.export_onnx(model, ids, tmp_path / "step.onnx", kv_cache=True, past_length=3)
    n_layers = model.config.num_hidden_layers
    assert report.ok and report.outputs == 1 + 2 * n_layers and report.exporter == "dynamo"
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert [o.name for o in session.get_outputs()][:2] == ["logits", "present.0.key"]

    # greedy decoding in onnxruntime after a one-token past, token for token as generate()
    prompt = ids[:, :5]
    with torch.no_grad():
        cache = model(input_ids=prompt[:, :1], use_cache=True).past_key_values
    past = [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
    tokens = prompt[:, 1:]
    generated = []
    for _ in range(4):
        length = past[0].shape[2] + tokens.shape[1]
        feed = {"input_ids": tokens.numpy(), "attention_mask": torch.ones(1, length, dtype=torch.long).numpy()}
        feed.update({name: value for name, value in zip(names[2:], past)})
        logits, *past = session.run(None, feed)
        tokens = torch.from_numpy(logits[:, -1:].argmax(-1))
        generated.append(int(tokens))
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert generated == expected[0, 5:].tolist()


def test_kv_cache_export_of_a_model_without_a_cache_names_the_model(tmp_path):
    with pytest.raises(TypeError, match=r"kv_cache export needs a Hugging Face decoder.*Linear"):
        torchslim.export_onnx(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "m.onnx", kv_cache=True)
    assert not (tmp_path / "m.onnx").exists()
