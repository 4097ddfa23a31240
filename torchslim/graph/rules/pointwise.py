"""Elementwise ops (add, mul, activations, where, dropout, copies): index i maps to index i,
with numpy broadcasting (a size-1 dimension couples to nothing)."""
from __future__ import annotations

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.rules._registry import align_broadcast, op_rule

import torch

aten = torch.ops.aten


def pointwise_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    for out in op.outputs:
        for source in op.inputs:
            align_broadcast(c, source, out)


op_rule(
    aten.clone, aten.detach, aten.alias, aten.lift_fresh, aten.contiguous, aten._to_copy,
    aten.native_dropout, aten.dropout, aten.hardtanh, aten.hardtanh_, aten.gelu, aten.silu,
    aten.hardswish, aten.hardsigmoid, aten.relu, aten.relu_, aten.leaky_relu, aten.elu,
    aten.softplus, aten.clamp, aten.clamp_min, aten.clamp_max, aten.where, aten.masked_fill,
    aten.copy_, aten.fill_, aten.zero_,
)(pointwise_rule)


@op_rule(aten._prelu_kernel, aten.prelu)
def prelu_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    """``aten.prelu`` takes the module's (C,) weight against channel dim 1; by the time
    ``_prelu_kernel`` runs, torch has viewed it as (1, C, 1, ...), which broadcasts like any
    elementwise operand. A single shared slope (size 1) couples to nothing."""
    x, weight = op.inputs[0], op.inputs[1]
    out = op.outputs[0]
    c.same_all(x, out)
    shape = c.shape(weight)
    if len(shape) == 1 and len(c.shape(x)) > 1:
        if shape[0] > 1:
            c.same(weight, 0, x, 1)
    else:
        align_broadcast(c, weight, x)
