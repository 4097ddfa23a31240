"""Reductions and softmax. Summing over a dimension is linear, so zeroed channels
contribute nothing and removal is exact; mean, max, var, norm and softmax over a
dimension see its length or its values, so removal there is marked inexact."""
from __future__ import annotations

import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.rules._registry import norm_dim, op_rule

aten = torch.ops.aten

_EXACT = {"sum", "nansum"}


@op_rule(aten.sum, aten.nansum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.std,
         aten.var_mean, aten.std_mean, aten.logsumexp, aten.norm, aten.linalg_vector_norm, aten.prod,
         aten.argmax, aten.argmin, aten.any, aten.all)
def reduce_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source = op.inputs[0]
    ndim = len(c.shape(source))
    dims = _reduced_dims(op, ndim)
    keepdim = bool(op.kwargs.get("keepdim", next((a for a in op.args[2:] if isinstance(a, bool)), False)))
    exact = op.func.overloadpacket.__name__ in _EXACT
    kept = [d for d in range(ndim) if d not in dims]
    for out in op.outputs:
        out_dims = range(ndim) if keepdim or len(c.shape(out)) == ndim else kept
        for od, sd in enumerate(out_dims):
            if sd not in dims:
                c.same(source, sd, out, od)
    if not exact:
        for d in dims:
            c.mark_inexact(source, d, f"{op.name} reduces over this dimension")


def _reduced_dims(op: OpCall, ndim: int) -> set[int]:
    dims = op.kwargs.get("dim", op.args[1] if len(op.args) > 1 else None)
    if isinstance(dims, bool) or dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return set(range(ndim))
    if isinstance(dims, int):
        return {norm_dim(dims, ndim)}
    if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        return {norm_dim(d, ndim) for d in dims}
    return set(range(ndim))  # e.g. norm(p) or a dtype argument: treat as full reduction


@op_rule(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax, aten._safe_softmax)
def softmax_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source, out = op.inputs[0], op.outputs[0]
    c.same_all(source, out)
    dim = norm_dim(op.arg(1, "dim"), len(c.shape(source)))
    c.mark_inexact(source, dim, f"{op.name} normalises over this dimension")
