"""MACs of a traced graph, before or after a (hypothetical) removal, without running the model.

Convention (one multiply-accumulate = 1 MAC = 2 FLOPs):

* convolutions, matrix products (linear, matmul, einsum, bmm) and GPU attention kernels use
  ``torch.utils.flop_counter``'s formulas / 2, so totals agree with torch's FLOP counter;
* the CPU attention kernel and nn.MultiheadAttention's fused fast path count their two
  products (``QK^T`` and ``AV``, plus projections for the fused op);
* bilinear / bicubic / linear interpolation: 4 / 16 / 2 MACs per output element (its taps);
  nearest: 0; average pooling: one MAC per input element read; max pooling: 0.
* elementwise ops, normalisation and activations count 0 (memory-bound, as thop and
  torch's counter do).

Each op is re-evaluated on meta tensors of its post-pruning shapes, so a MACs target is
searched in milliseconds per candidate.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import flop_registry

from torchslim.graph._trace import NodeRef, OpCall
from torchslim.graph.dependency import DependencyGraph


def _meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _formula(op: OpCall):
    return flop_registry.get(op.func.overloadpacket)


def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def _attention_macs(op: OpCall, shapes) -> int:
    q, k, v = (shapes(n) for n in op.inputs[:3])
    batch = _numel(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _native_mha_macs(op: OpCall, shapes) -> int:
    q, k = shapes(op.inputs[0]), shapes(op.inputs[1])
    embed = q[-1]
    tokens_q, tokens_k = _numel(q[:-1]), _numel(k[:-1])
    projections = tokens_q * embed * embed * 2 + tokens_k * embed * embed * 2  # q, out; k, v
    attention = _numel(q[:-2]) * q[-2] * k[-2] * embed * 2
    return projections + attention


def _per_output(macs_per_element: int):
    return lambda op, shapes: macs_per_element * _numel(shapes(op.outputs[0]))


def _per_input(op: OpCall, shapes) -> int:
    return _numel(shapes(op.inputs[0]))


aten = torch.ops.aten
EXTRA_MACS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_macs,
    aten._scaled_dot_product_attention_math: _attention_macs,
    aten._native_multi_head_attention: _native_mha_macs,
    aten.upsample_bilinear2d: _per_output(4),
    aten._upsample_bilinear2d_aa: _per_output(4),
    aten.upsample_linear1d: _per_output(2),
    aten.upsample_bicubic2d: _per_output(16),
    aten.upsample_trilinear3d: _per_output(8),
    aten.avg_pool1d: _per_input,
    aten.avg_pool2d: _per_input,
    aten.avg_pool3d: _per_input,
    aten._adaptive_avg_pool2d: _per_input,
    aten.adaptive_avg_pool1d: _per_input,
    aten._adaptive_avg_pool3d: _per_input,
}


def has_macs(op: OpCall) -> bool:
    return op.func.overloadpacket in EXTRA_MACS or _formula(op) is not None


def _materialize(value, shapes):
    if isinstance(value, NodeRef):
        return _meta(shapes(value.node))
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, shapes) for v in value)
    return value


def op_macs(op: OpCall, shapes) -> int:
    """MACs of one op given ``shapes(node) -> shape``; 0 for ops without a formula."""
    extra = EXTRA_MACS.get(op.func.overloadpacket)
    if extra is not None:
        return int(extra(op, shapes))
    formula = _formula(op)
    if formula is None:
        return 0
    args = _materialize(op.args, shapes)
    kwargs = {k: _materialize(v, shapes) for k, v in op.kwargs.items()}
    outs = [_meta(shapes(n)) for n in op.outputs]
    out_val = outs[0] if len(outs) == 1 else tuple(outs)
    try:
        return int(formula(*args, out_val=out_val, **kwargs)) // 2
    except Exception:  # a formula that cannot read this call counts nothing rather than failing pruning
        return 0


def estimate_macs(graph: DependencyGraph, removed_atoms: np.ndarray | None = None) -> int:
    """MACs of the traced model after removing ``removed_atoms`` (none: the original)."""
    removed = np.zeros(graph.n_atoms, dtype=bool)
    if removed_atoms is not None and len(removed_atoms):
        removed[np.asarray(removed_atoms, dtype=np.int64)] = True
    cache: dict[int, tuple[int, ...]] = {}

    def shapes(node: int) -> tuple[int, ...]:
        if node not in cache:
            cache[node] = graph.new_shape(node, removed) if removed.any() else graph.trace.nodes[node].shape
        return cache[node]

    return sum(op_macs(op, shapes) for op in graph.trace.ops if has_macs(op))
