"""Matrix products: mm, addmm, bmm, baddbmm (F.linear, matmul and einsum arrive as these),
and the grouped product of fused mixture-of-experts layers.

The contracted dimension couples the two operands; the free dimensions couple to the output.
"""
from __future__ import annotations

import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.rules._registry import align_broadcast, node_arg, op_rule, tensor_arg

aten = torch.ops.aten


def _couple_product(c: Coupling, a: int, b: int, out: int, trace: Trace) -> None:
    ndim = len(c.shape(out))
    if a in trace.activations and b in trace.activations:
        # a product of two activations (attention scores q @ k^T) is usually rescaled by a
        # size read in Python (1 / sqrt(head_dim)), which no op shows: not provably exact
        c.mark_inexact(a, -1, "product of two activations (a scale may depend on this width)")
        for d in range(ndim - 2):  # its batch dims hold the attention heads, as SDPA's do
            c.hint(a, d)
            c.hint(b, d)
    for d in range(ndim - 2):  # batch dims
        c.same(a, d, out, d)
        c.same(b, d, out, d)
    c.same(a, -1, b, -2)
    c.same(a, -2, out, -2)
    c.same(b, -1, out, -1)


@op_rule(aten.mm, aten.bmm)
def mm_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    _couple_product(c, op.inputs[0], op.inputs[1], op.outputs[0], trace)


@op_rule(aten.addmm, aten.baddbmm, aten.addbmm)
def addmm_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    first, second = ("mat1", "mat2") if node_arg(op, 1, "mat1") is not None else ("batch1", "batch2")  # baddbmm's names
    bias, a, b = tensor_arg(op, 0, "self"), tensor_arg(op, 1, first), tensor_arg(op, 2, second)
    _couple_product(c, a, b, op.outputs[0], trace)
    align_broadcast(c, bias, op.outputs[0])


@op_rule(aten._grouped_mm)
def grouped_mm_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    """``_grouped_mm(tokens (T, K), experts (E, K, N), offs)``: each run of tokens (sorted by
    expert, ``offs`` their ends) meets its expert's matrix. K and N couple as in ``mm``, across
    all experts at once (a fused tensor has one width); the expert dim is fixed by ``offs``."""
    a, b, out = tensor_arg(op, 0, "self"), tensor_arg(op, 1, "mat2"), op.outputs[0]
    if len(c.shape(a)) != 2 or len(c.shape(b)) != 3:
        raise ValueError(f"{op.name}: only tokens (T, K) x experts (E, K, N) is understood, got "
                         f"{c.shape(a)} x {c.shape(b)}")
    c.pin(b, 0, "experts chosen by the offsets of a grouped product")
    c.same(a, 0, out, 0)
    c.same(a, 1, b, 1)
    c.same(b, 2, out, 1)
