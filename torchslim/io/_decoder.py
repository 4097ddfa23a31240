"""Hugging Face decoders as plain tensor-in, tensor-out modules for ONNX export.

A decoder's forward takes and returns a ``Cache`` object, which neither ONNX exporter can
carry. Without a cache the decoder is called with ``use_cache=False``. With one, the
past keys and values become explicit inputs (``past_key_values.{i}.key|value``) and the
updated ones explicit outputs (``present.{i}.key|value``), the layout ONNX Runtime's
generation loops use; a pruned model's layers may each keep a different number of KV
heads, which this layout carries per layer.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from torchslim.pruning import hf_config_of


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def is_hf_decoder(model: nn.Module) -> bool:
    """A Hugging Face model whose forward can return a key/value cache."""
    return hf_config_of(model) is not None and accepts(model, "use_cache")


def without_cache(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``use_cache=False`` for a Hugging Face decoder the caller did not say
    otherwise for (its cache object is not an exportable output)."""
    if is_hf_decoder(model) and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


def _cache_kwarg(model: nn.Module) -> str:
    return "cache" if accepts(model, "cache") else "past_key_values"


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """A cache's keys and values, layer by layer: ``[k0, v0, k1, v1, ...]``."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):  # transformers < 4.56
        return [t for pair in zip(cache.key_cache, cache.value_cache) for t in pair]
    return [t for pair in cache for t in pair[:2]]  # legacy tuple of (key, value) per layer


class DecoderWithCache(nn.Module):
    """``forward(input_ids, attention_mask, *past) -> (logits, *present)`` around a HF decoder."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not is_hf_decoder(model):
            raise TypeError(f"kv_cache export needs a Hugging Face decoder (a model with a `config` whose forward "
                            f"takes `use_cache`); got {type(model).__name__}")
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple:
        from transformers import DynamicCache

        cache = DynamicCache(config=hf_config_of(self.model))
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{_cache_kwarg(self.model): cache})
        return (out.logits, *cache_tensors(out.past_key_values))

    @torch.no_grad()
    def example_inputs(self, input_ids: torch.Tensor, past_length: int) -> tuple[torch.Tensor, ...]:
        """``input_ids`` as the new tokens after a past of ``past_length`` tokens (the past's keys
        and values computed by the model on the first tokens of ``input_ids``, repeated)."""
        if past_length < 1:
            raise ValueError(f"past_length must be >= 1, got {past_length}")
        prefix = input_ids.repeat(1, -(-past_length // input_ids.shape[1]))[:, :past_length]
        prefilled = self.model(input_ids=prefix, use_cache=True)
        past = cache_tensors(prefilled.past_key_values)
        mask = torch.ones(input_ids.shape[0], past_length + input_ids.shape[1], dtype=torch.long)
        return (input_ids, mask, *[t.detach().clone() for t in past])

    def names(self, n_past: int) -> tuple[list[str], list[str]]:
        """ONNX input and output names for ``n_past`` past tensors."""
        kinds = ("key", "value")
        past = [f"past_key_values.{i // 2}.{kinds[i % 2]}" for i in range(n_past)]
        present = [f"present.{i // 2}.{kinds[i % 2]}" for i in range(n_past)]
        return ["input_ids", "attention_mask", *past], ["logits", *present]

    @staticmethod
    def dynamic_shapes(n_past: int) -> tuple:
        """Batch, new-token, total-length and past-length axes left free in the exported graph,
        one entry per flat input."""
        batch, new, total, past = (torch.export.Dim(n) for n in ("batch", "sequence", "total_sequence", "past_sequence"))
        return ({0: batch, 1: new}, {0: batch, 1: total}, *({0: batch, 2: past} for _ in range(n_past)))
