"""Keep a Hugging Face model's ``config`` true to its pruned shapes, so that
``save_pretrained`` / ``from_pretrained`` rebuild the pruned model.

A config can only describe uniform layers (one ``intermediate_size``, one head count for
every layer). Which config fields size which weights is learnt from the model class
itself, not from a table per architecture: the class is instantiated on the ``meta``
device (no memory, no initialisation cost) with one size field changed, and the weight
dimensions that move are the ones that field controls (``size = a * field + b``). Solving
those for the pruned sizes gives the new field values; the result is accepted only if a
model built from the new config has exactly the pruned model's shapes.
"""
from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

#: integer config fields that size FFN widths, head counts, head dims and expert counts across the HF zoo
SIZE_FIELDS = ("intermediate_size", "d_ff", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
               "moe_intermediate_size", "shared_expert_intermediate_size",
               "num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "encoder_attention_heads",
               "decoder_attention_heads", "head_dim", "d_kv", "kv_channels",
               "num_local_experts", "num_experts", "n_routed_experts")

Shapes = dict[str, tuple[int, ...]]


def hf_config_of(model: nn.Module) -> Any | None:
    """The model's ``transformers.PretrainedConfig``, or None. Never imports transformers (half
    a second): a Hugging Face model's config means it is imported already."""
    config = getattr(model, "config", None)
    transformers = sys.modules.get("transformers")
    if config is None or transformers is None:
        return None
    return config if isinstance(config, transformers.PretrainedConfig) else None


def sync_hf_config(model: nn.Module) -> dict[str, int] | None:
    """Set ``model.config``'s size fields to the pruned model's widths; returns the fields
    changed (``{}`` if none needed), or None when no config describes the model (no HF config,
    non-uniform layers, or sizes the class derives in a way a config cannot express, such as
    BERT's ``head_size = hidden_size // num_heads`` after heads were pruned). The config is
    left unchanged in that case."""
    config = hf_config_of(model)
    if config is None:
        return None
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        base = _shapes_for(model, config, {})
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt from its config
        return None
    if base == actual:
        return {}
    updates = _frozen_derived_fields(model, config, base)
    for _ in range(2):  # a fused size (Phi-3's qkv: heads + 2 x kv heads) solves once the other field is known
        for field in SIZE_FIELDS:
            if not hasattr(config, field) or field in updates:
                continue
            value = getattr(config, field)
            if value is not None and (type(value) is not int or value <= 0):
                continue
            solved = _solve_field(model, config, field, value, updates, actual)
            if solved is not None and solved != value:
                updates[field] = solved
    if not updates:
        return None
    try:
        rebuilt = _shapes_for(model, config, updates)
    except Exception:  # noqa: BLE001
        return None
    if rebuilt != actual:
        return None
    for field, value in updates.items():
        setattr(config, field, value)
    return updates


def _frozen_derived_fields(model: nn.Module, config, base: Shapes) -> dict[str, int]:
    """Size fields the config leaves ``None`` or out for the class to derive (Mixtral's and
    Phi-3's ``head_dim = hidden_size // num_attention_heads``), set to the value every module uses, so that pruning
    heads solves for a head count at a fixed head size rather than for a different head size."""
    frozen: dict[str, int] = {}
    for field in SIZE_FIELDS:
        if getattr(config, field, None) is not None:  # set, or absent and read with a default (Phi-3)
            continue
        values = {v for m in model.modules() if type(v := vars(m).get(field)) is int}
        if len(values) != 1:
            continue
        candidate = {**frozen, field: values.pop()}
        try:
            if _shapes_for(model, config, candidate) == base:
                frozen = candidate
        except Exception:  # noqa: BLE001 - a class that refuses the explicit value
            continue
    return frozen


def _solve_field(model, config, field: str, value: int | None, updates: dict[str, int],
                 actual: Shapes) -> int | None:
    """The value of ``field`` that explains the pruned sizes of the dims it controls (a field
    left ``None``, like GPT-2's ``n_inner``, is probed at two explicit values)."""
    low = value or 8
    try:
        before = _shapes_for(model, config, {**updates, field: low})
        after = _shapes_for(model, config, {**updates, field: 2 * low})
    except Exception:  # noqa: BLE001 - e.g. a head count that must divide the hidden size
        return None
    candidates = set()
    for key, shape in before.items():
        probe, pruned = after.get(key), actual.get(key)
        if probe is None or pruned is None or len(probe) != len(shape) or len(pruned) != len(shape):
            continue
        for old, new, now in zip(shape, probe, pruned):
            if old == new:
                continue
            slope = (new - old) / low  # size = slope * field + offset
            solved = (now - (old - slope * low)) / slope
            candidates.add(round(solved) if abs(solved - round(solved)) < 1e-9 and solved >= 1 else -1)
    # a size that also moves with a field not solved yet gives no valid value here: the others
    # decide, and the rebuild of the whole model at the end checks the combination
    valid = candidates - {-1}
    return valid.pop() if len(valid) == 1 else None


def _shapes_for(model: nn.Module, config, updates: dict[str, int]) -> Shapes:
    """State-dict shapes of ``type(model)`` built on the meta device from ``config`` + ``updates``."""
    new_config = copy.deepcopy(config)
    for field, value in updates.items():
        setattr(new_config, field, value)
    with torch.device("meta"):
        rebuilt = type(model)(new_config)
    return {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
