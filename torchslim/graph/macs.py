"""MACs of a traced graph, before or after a (hypothetical) removal, without running the model.

Each recorded op with a FLOP formula in ``torch.utils.flop_counter`` (convolutions, matrix
products, attention) is re-evaluated on meta tensors of its post-pruning shapes; MACs are
FLOPs / 2. Used to search ratios for a MACs target in milliseconds per candidate.
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


def _materialize(value, shapes):
    if isinstance(value, NodeRef):
        return _meta(shapes(value.node))
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, shapes) for v in value)
    return value


def op_macs(op: OpCall, shapes) -> int:
    """MACs of one op given ``shapes(node) -> shape``; 0 for ops without a formula."""
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

    return sum(op_macs(op, shapes) for op in graph.trace.ops if _formula(op) is not None)
