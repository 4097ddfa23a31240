"""The one MAC counter: a traced graph's MACs before or after a (hypothetical) removal, and
the live counter that the analysis runs a forward pass under.

Convention: one multiply-accumulate = 1 MAC = 2 FLOPs; torch's FLOP formulas
(``torch.utils.flop_counter``) / 2 for convolutions and matrix products, the shared table of
``torchslim.graph._formulas`` for what torch does not count (attention kernels, interpolation,
pooling, reductions, recurrent kernels), 0 for memory-bound ops. ``nn.MultiheadAttention`` is
counted as the projections and attention it computes: the live counter runs it with its fused
fast path disabled, the graph counts the fused op as the same products. Each op of a graph is
re-evaluated on the shapes it has after the removal, so a MACs target is searched in
milliseconds per candidate.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from torchslim.graph._formulas import CUSTOM_MAPPING
from torchslim.graph._trace import NodeRef, OpCall
from torchslim.graph.conv_args import conv_args
from torchslim.graph.dependency import DependencyGraph
from torchslim.graph.rules.recurrent import RECURRENT_OPS, recurrent_macs


LOG = logging.getLogger(__name__)


def live_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts a forward pass in this module's convention (FLOPs = 2 x MACs);
    run the model under :func:`fastpath_disabled` as well, so fused attention is seen as products."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_MAPPING)


@contextlib.contextmanager
def fastpath_disabled() -> Iterator[None]:
    """Let MHA / TransformerEncoderLayer run their unfused path so their matmuls are seen."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def _meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _formula(op: OpCall):
    return flop_registry.get(op.func.overloadpacket)


def _numel(shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def _native_mha_macs(op: OpCall, shapes) -> int:
    """The fused MHA kernel: q/k/v/out projections plus ``QK^T`` and ``AV`` (as when unfused)."""
    q, k = shapes(op.inputs[0]), shapes(op.inputs[1])
    embed = q[-1]
    projections = 2 * _numel(q[:-1]) * embed * embed + 2 * _numel(k[:-1]) * embed * embed
    return projections + _numel(q[:-2]) * q[-2] * k[-2] * embed * 2


def _conv_macs(op: OpCall, shapes) -> int:
    """torch's conv formula / 2: batch x spatial positions (output's, or input's if transposed) x weight size."""
    x, w, out = shapes(op.args[0].node), shapes(op.args[1].node), shapes(op.outputs[0])
    spatial = (x if conv_args(op).transposed else out)[2:]
    return x[0] * _numel(spatial) * _numel(w)


def _matmul_macs(first: int):
    """mm / addmm / bmm: (..., m, k) @ (..., k, n) -> batch x m x k x n; ``first`` = position of mat1."""
    def macs(op: OpCall, shapes) -> int:
        a, b = shapes(op.args[first].node), shapes(op.args[first + 1].node)
        return _numel(a) * b[-1]
    return macs


def _grouped_mm_macs(op: OpCall, shapes) -> int:
    """tokens (T, K) x experts (E, K, N): each token row meets one expert, T x K x N."""
    a, b = shapes(op.args[0].node), shapes(op.args[1].node)
    return _numel(a) * b[-1]


aten = torch.ops.aten
# ops computing several layers at once; recurrent layers are traced as one op per module call
FUSED: dict[Any, Callable[..., int]] = {aten._native_multi_head_attention: _native_mha_macs, **{op: recurrent_macs for op in RECURRENT_OPS}}
# the commonest ops, counted from shapes directly (same numbers as torch's formulas, which need
# meta tensors built per call: most of the time of a MACs-target search)
DIRECT = {aten.convolution: _conv_macs, aten.mm: _matmul_macs(0), aten.addmm: _matmul_macs(1),
          aten.bmm: _matmul_macs(0), aten._grouped_mm: _grouped_mm_macs}


def has_macs(op: OpCall) -> bool:
    packet = op.func.overloadpacket
    return packet in FUSED or packet in DIRECT or packet in CUSTOM_MAPPING or _formula(op) is not None


def _replace_nodes(value, leaf):
    """Recorded arguments with every tensor placeholder replaced by ``leaf(node)``."""
    if isinstance(value, NodeRef):
        return leaf(value.node)
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_nodes(v, leaf) for v in value)
    return value


class MacsError(RuntimeError):
    """A MAC formula could not read a traced op: counting it as 0 would let a MACs target be
    "met" by an op that was never counted, so the count stops here, naming the op."""

    def __init__(self, op: OpCall, exc: Exception):
        super().__init__(f"cannot count the MACs of {op.name} in module '{op.module or '<root>'}': "
                         f"its formula raised {type(exc).__name__}: {exc}")
        self.op = op


def op_macs(op: OpCall, shapes) -> int:
    """MACs of one op given ``shapes(node) -> shape``; 0 for ops without a formula.

    Raises :class:`MacsError` when the op's formula fails on this call."""
    packet = op.func.overloadpacket
    if packet in DIRECT:
        try:
            return int(DIRECT[packet](op, shapes))
        except (AttributeError, IndexError, TypeError):  # an unusual call spelling: torch's formula reads it
            LOG.debug("%s in module '%s': the shape shortcut could not read the call; torch's formula counts it",
                      op.name, op.module or "<root>")
    try:
        return _formula_macs(op, shapes)
    except Exception as exc:  # any formula failure is reported with the op it concerns
        raise MacsError(op, exc) from exc


def _formula_macs(op: OpCall, shapes) -> int:
    packet = op.func.overloadpacket
    if packet in FUSED:
        return int(FUSED[packet](op, shapes))
    if packet in CUSTOM_MAPPING:  # these formulas take shapes, as FlopCounterMode hands them
        as_shape = lambda node: tuple(shapes(node))  # noqa: E731
        args = _replace_nodes(op.args, as_shape)
        kwargs = {k: _replace_nodes(v, as_shape) for k, v in op.kwargs.items()}
        out = [tuple(shapes(n)) for n in op.outputs]
        return int(CUSTOM_MAPPING[packet](*args, out_shape=out[0] if len(out) == 1 else tuple(out), **kwargs)) // 2
    formula = _formula(op)
    if formula is None:
        return 0
    as_meta = lambda node: _meta(shapes(node))  # noqa: E731
    args = _replace_nodes(op.args, as_meta)
    kwargs = {k: _replace_nodes(v, as_meta) for k, v in op.kwargs.items()}
    outs = [_meta(shapes(n)) for n in op.outputs]
    out_val = outs[0] if len(outs) == 1 else tuple(outs)
    return int(formula(*args, out_val=out_val, **kwargs)) // 2


def estimate_macs(graph: DependencyGraph, removed_atoms: np.ndarray | None = None) -> int:
    """MACs of the traced model after removing ``removed_atoms`` (none: the original)."""
    removed = np.zeros(graph.n_atoms, dtype=bool)
    if removed_atoms is not None and len(removed_atoms):
        removed[np.asarray(removed_atoms, dtype=np.int64)] = True
    shapes = graph.shapes_after(removed) if removed.any() else [node.shape for node in graph.trace.nodes]
    memo = graph._macs_memo  # the target searches ask for many removals that leave most ops as they were
    total = 0
    for op in graph.trace.ops:
        key = (op.index, *(shapes[n] for n in op.inputs), *(shapes[n] for n in op.outputs))
        if key not in memo:
            memo[key] = op_macs(op, shapes.__getitem__) if has_macs(op) else 0
        total += memo[key]
    return total
