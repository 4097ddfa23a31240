"""Fused attention kernels: scaled_dot_product_attention's CPU/GPU kernels and the
fast path of nn.MultiheadAttention (``_native_multi_head_attention``)."""
from __future__ import annotations

import numpy as np
import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.rules._registry import node_arg, op_rule, tensor_arg

aten = torch.ops.aten


@op_rule(aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
         aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_attention_math,
         aten._scaled_dot_product_cudnn_attention, aten.scaled_dot_product_attention,
         aten._scaled_dot_product_fused_attention_overrideable)
def sdpa_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    q, k, v = (tensor_arg(op, i, name) for i, name in enumerate(("query", "key", "value")))
    out = op.outputs[0]
    batch = len(c.shape(q)) - 2
    for d in range(batch):
        c.same(q, d, out, d)
        for kv in (k, v):
            _couple_heads(c, q, kv, d)
    if batch >= 2:  # [batch, heads, tokens, dim]: heads are the unit to prune
        for x in (q, k, v):
            c.hint(x, batch - 1)
    c.same(q, -1, k, -1)
    c.same(k, -2, v, -2)
    c.same(q, -2, out, -2)
    c.same(v, -1, out, -1)
    if len(op.inputs) > 3:  # attn_mask / bias, broadcast to [*batch, L, S]
        _couple_mask(c, op.inputs[3], q, k)
    if op.kwargs.get("scale") is None:  # the default scale 1/sqrt(head_dim) follows the pruned width
        c.mark_inexact(q, -1, "attention scale depends on the head dim")
    for stat in op.outputs[1:]:  # logsumexp [B, H, L] and friends
        shape = c.shape(stat)
        if len(shape) >= batch and shape[:batch] == c.shape(q)[:batch]:
            for d in range(batch):
                c.same(q, d, stat, d)
        else:
            c.pin(stat, None, "attention statistics")


def _couple_mask(c: Coupling, mask: int, q: int, k: int) -> None:
    mask_shape, q_shape = c.shape(mask), c.shape(q)
    for back in range(1, len(mask_shape) + 1):
        if mask_shape[-back] == 1:
            continue
        if back == 1:
            c.same(mask, -1, k, -2)
        elif back <= len(q_shape):
            c.same(mask, -back, q, -back)


def _couple_heads(c: Coupling, q: int, kv: int, dim: int) -> None:
    """Query heads to key/value heads; with grouped-query attention (enable_gqa) query head h
    reads kv head h // n_rep, so a kv head and its n_rep query heads form one atom."""
    q_heads, kv_heads = c.shape(q)[dim], c.shape(kv)[dim]
    if q_heads == kv_heads or q_heads % kv_heads:
        c.same(q, dim, kv, dim)
        return
    heads = np.arange(q_heads, dtype=np.int64)
    c.union(c.ids(q, dim), c.ids(kv, dim, heads // (q_heads // kv_heads)))


@op_rule(aten._native_multi_head_attention)
def native_mha_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    q, k, v = op.inputs[0], op.inputs[1], op.inputs[2]
    heads = op.arg(4, "num_head")
    qkv_w, qkv_b = tensor_arg(op, 5, "qkv_weight"), node_arg(op, 6, "qkv_bias")
    proj_w, proj_b = tensor_arg(op, 7, "proj_weight"), node_arg(op, 8, "proj_bias")
    out = op.outputs[0]
    embed = c.shape(qkv_w)[1]
    for x in (q, k, v):
        c.same(x, -1, qkv_w, 1)
    rows = np.arange(3 * embed, dtype=np.int64)
    c.union(c.ids(qkv_w, 0), c.ids(qkv_w, 1, rows % embed))  # q/k/v blocks follow the embed dim
    if qkv_b is not None:
        c.same(qkv_b, 0, qkv_w, 0)
    c.same(proj_w, 1, qkv_w, 1)
    c.same(proj_w, 0, qkv_w, 1)
    if proj_b is not None:
        c.same(proj_b, 0, proj_w, 0)
    ids = c.ids(qkv_w, 1)
    c.union(ids, ids[np.arange(embed) % (embed // heads)])  # same position in every head
    c.mark_inexact(qkv_w, 1, "attention scale depends on the head dim")
    c.same(q, 0, out, 0)
    c.same(q, 1, out, 1)
    c.same(out, 2, proj_w, 0)
    for extra in op.outputs[1:]:
        c.pin(extra, None, "attention weights")
