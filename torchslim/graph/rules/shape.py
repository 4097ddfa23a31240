"""Ops that move indices without computing: view/reshape, permute, expand, slicing,
concatenation and splitting. Each maps input indices to output indices exactly.

Reshape index algebra: both shapes are cut into *digits*, the finest ranges of the flat
index that both shapes agree on (``[1, T, 12*64] -> [1, T, 12, 64]`` has digits T, 12, 64).
A digit that is a whole dimension on both sides couples index to index. Where a
dimension spans several digits (a split or a merge), indices are coupled by the value
of one chosen digit: the outermost digit with at least 4 values (heads rather than the
"3" of a fused qkv or the "2" of a channel shuffle), else the largest. Removing one
value of that digit removes a contiguous block on the merged side, which the reshape can
follow; dimensions of the chunk that do not contain the chosen digit are pinned.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import BUFFER, OpCall, Trace
from torchslim.graph.rules._registry import node_arg, node_list_arg, norm_dim, op_rule

aten = torch.ops.aten
MIN_CHOSEN_DIGIT = 4
BROADCAST_PIN = "broadcast or added dimension"  # copies of one value: never a pruning unit


def _dim_ranges(shape: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """Flat-index range ``[stride, stride*size)`` of each dimension (None for size 1)."""
    ranges: list[tuple[int, int] | None] = []
    stride = 1
    for size in reversed(shape):
        ranges.append((stride, stride * size) if size > 1 else None)
        stride *= size
    return list(reversed(ranges))


def couple_reshape(c: Coupling, source: int, target: int, op_index: int = -1) -> None:
    """Couple the indices of two views of the same contiguous data."""
    in_shape, out_shape = c.shape(source), c.shape(target)
    if math.prod(in_shape) != math.prod(out_shape):
        c.pin(source, None, "reshape with different numel")
        c.pin(target, None, "reshape with different numel")
        return
    sides = {source: _dim_ranges(in_shape), target: _dim_ranges(out_shape)}
    bounds = sorted({b for r in sides.values() for rng in r if rng for b in rng})
    digits = list(zip(bounds[:-1], bounds[1:]))
    # digits covered by each dimension of each side
    covers: dict[tuple[int, int], list[int]] = {}
    for node, ranges in sides.items():
        for d, rng in enumerate(ranges):
            if rng is None:
                continue
            covers[(node, d)] = [k for k, (lo, hi) in enumerate(digits) if lo >= rng[0] and hi <= rng[1]]
    for number, chunk in enumerate(_chunks(covers, len(digits))):
        _couple_chunk(c, chunk, covers, digits, (op_index, number))


def _chunks(covers: dict[tuple[int, int], list[int]], n_digits: int) -> list[list[tuple[int, int]]]:
    """Group dimensions that share digits (transitively)."""
    parent = list(range(n_digits))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for ks in covers.values():
        for k in ks[1:]:
            parent[find(k)] = find(ks[0])
    groups: dict[int, list[tuple[int, int]]] = {}
    for dim, ks in covers.items():
        groups.setdefault(find(ks[0]), []).append(dim)
    return list(groups.values())


def _candidate_digits(chunk_digits: list[int], sizes: dict[int, int]) -> list[int]:
    """Digits in order of preference: outermost with >= 4 values first, then by size."""
    outer_first = sorted(chunk_digits, reverse=True)
    big = [k for k in outer_first if sizes[k] >= MIN_CHOSEN_DIGIT]
    rest = sorted((k for k in chunk_digits if k not in big), key=lambda k: (-sizes[k], -k))
    return big + rest


def _couple_chunk(c, chunk, covers, digits, key) -> None:
    chunk_digits = sorted({k for dim in chunk for k in covers[dim]})
    if len(chunk_digits) == 1:
        (a_node, a_dim), (b_node, b_dim) = chunk[0], chunk[1]
        c.same(a_node, a_dim, b_node, b_dim)
        return
    sizes = {k: digits[k][1] // digits[k][0] for k in chunk_digits}
    candidates = _candidate_digits(chunk_digits, sizes)
    # the graph may revisit this choice when the preferred digit ends up pinned (see DependencyGraph.build)
    chosen = candidates[min(c.digit_choices.get(key, 0), len(candidates) - 1)]
    c.reshape_choices.append((key, [[(n, d) for n, d in chunk if k in covers[(n, d)]] for k in candidates]))
    lo, _ = digits[chosen]
    size = sizes[chosen]
    representative: np.ndarray | None = None
    for node, dim in chunk:
        if chosen not in covers[(node, dim)]:
            c.pin(node, dim, "reshape dimension outside the coupled digit")
            continue
        dim_size = c.shape(node)[dim]
        stride = digits[covers[(node, dim)][0]][0]
        index = np.arange(dim_size, dtype=np.int64)
        value = (index * stride // lo) % size
        ids = c.ids(node, dim)
        first = np.zeros(size, dtype=np.int64)
        first[value[::-1]] = ids[::-1]  # first element carrying each digit value
        if representative is None:
            representative = first
        c.union_by_choice(ids, representative[value])
        c.union_by_choice(first, representative)


@op_rule(aten.view, aten._unsafe_view, aten.reshape, aten.squeeze, aten.unsqueeze, aten.flatten,
         aten.unflatten, aten.view_as, aten.reshape_as)
def reshape_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    couple_reshape(c, op.inputs[0], op.outputs[0], op.index)


@op_rule(aten.permute)
def permute_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source, target = op.inputs[0], op.outputs[0]
    ndim = len(c.shape(source))
    for d, p in enumerate(op.arg(1, "dims")):
        c.same(source, norm_dim(p, ndim), target, d)


@op_rule(aten.transpose, aten.t, aten.swapaxes, aten.swapdims)
def transpose_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source, target = op.inputs[0], op.outputs[0]
    ndim = len(c.shape(source))
    if ndim < 2:
        c.same_all(source, target)
        return
    d0 = norm_dim(op.arg(1, "dim0", 0), ndim)
    d1 = norm_dim(op.arg(2, "dim1", 1), ndim)
    order = list(range(ndim))
    order[d0], order[d1] = order[d1], order[d0]
    for d, p in enumerate(order):
        c.same(source, p, target, d)


@op_rule(aten.expand, aten.expand_as, aten.repeat)
def tile_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    """expand (size-1 dims broadcast) and repeat (``weight.repeat(b)`` inside instance_norm):
    output index j copies input index j % n; a broadcast or new leading dim is pinned."""
    source, out = op.inputs[0], op.outputs[0]
    src, dst = c.shape(source), c.shape(out)
    shift = len(dst) - len(src)
    for d in range(len(dst)):
        sd = d - shift
        if sd >= 0 and src[sd] == dst[d]:
            c.same(source, sd, out, d)
        elif sd < 0 or src[sd] == 1:
            if dst[d] > 1:
                c.pin(out, d, BROADCAST_PIN)
        else:
            index = np.arange(dst[d], dtype=np.int64)
            c.union(c.ids(out, d), c.ids(source, sd, index % src[sd]))


def _clamp(value: int | None, size: int, default: int) -> int:
    if value is None:
        return default
    value = value + size if value < 0 else value
    return max(0, min(size, value))


@op_rule(aten.slice)
def slice_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source, target = op.inputs[0], op.outputs[0]
    ndim = len(c.shape(source))
    dim = norm_dim(op.arg(1, "dim", 0), ndim)
    size = c.shape(source)[dim]
    start = _clamp(op.arg(2, "start"), size, 0)
    step = op.arg(4, "step", 1) or 1
    for d in range(ndim):
        if d != dim:
            c.same(source, d, target, d)
    kept = np.arange(c.shape(target)[dim], dtype=np.int64)
    c.union(c.ids(source, dim, start + kept * step), c.ids(target, dim, kept))
    if step != 1:
        c.pin(source, dim, "strided slice")


@op_rule(aten.select)
def select_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source, target = op.inputs[0], op.outputs[0]
    ndim = len(c.shape(source))
    dim = norm_dim(op.arg(1, "dim", 0), ndim)
    c.pin(source, dim, "select (integer indexing) on this dimension")
    for d, sd in enumerate(x for x in range(ndim) if x != dim):
        c.same(source, sd, target, d)


def _couple_pieces(c: Coupling, whole: int, pieces: list[int], dim: int) -> None:
    """``whole`` is the concatenation of ``pieces`` along ``dim``."""
    ndim = len(c.shape(whole))
    dim = norm_dim(dim, ndim)
    offset = 0
    for piece in pieces:
        shape = c.shape(piece)
        if len(shape) != ndim:  # legacy empty tensors in cat
            continue
        for d in range(ndim):
            if d != dim:
                c.same(piece, d, whole, d)
        index = np.arange(shape[dim], dtype=np.int64)
        c.union(c.ids(piece, dim), c.ids(whole, dim, offset + index))
        offset += shape[dim]


@op_rule(aten.cat, aten.concat, aten.concatenate)
def cat_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    _couple_pieces(c, op.outputs[0], node_list_arg(op, 0, "tensors"), op.arg(1, "dim", 0))


@op_rule(aten.split, aten.split_with_sizes, aten.unsafe_split, aten.tensor_split, aten.chunk)
def split_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    dim = op.arg(2, "dim", 0)
    _couple_pieces(c, op.inputs[0], op.outputs, dim)
    if op.func.overloadpacket is not aten.split_with_sizes:
        # equal pieces (chunk, split by one size) must stay equal: couple their i-th indices
        sizes = {c.shape(o)[dim] for o in op.outputs}
        if len(sizes) == 1:
            for piece in op.outputs[1:]:
                c.same(piece, dim, op.outputs[0], dim)
        else:
            c.pin(op.inputs[0], dim, "split into pieces of one size with a shorter last piece")


@op_rule(aten.stack)
def stack_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    target = op.outputs[0]
    dim = norm_dim(op.arg(1, "dim", 0), len(c.shape(target)))
    c.pin(target, dim, "stacked dimension")
    for piece in node_list_arg(op, 0, "tensors"):
        for d in range(len(c.shape(piece))):
            c.same(piece, d, target, d if d < dim else d + 1)


@op_rule(aten.unbind)
def unbind_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source = op.inputs[0]
    dim = norm_dim(op.arg(1, "dim", 0), len(c.shape(source)))
    c.pin(source, dim, "unbound dimension")
    for piece in op.outputs:
        for d in range(len(c.shape(piece))):
            c.same(piece, d, source, d if d < dim else d + 1)


@op_rule(aten.index_select)
def index_select_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source, target = op.inputs[0], op.outputs[0]
    ndim = len(c.shape(source))
    dim = norm_dim(op.arg(1, "dim", 0), ndim)
    index_node = node_arg(op, 2, "index")
    values = trace.values.get(index_node) if index_node is not None else None
    for d in range(ndim):
        if d != dim:
            c.same(source, d, target, d)
    if values is None or index_node is None:
        c.pin(source, dim, "index_select with unknown indices")
        c.pin(target, dim, "index_select with unknown indices")
        return
    picked = np.asarray(values.reshape(-1).tolist(), dtype=np.int64)
    c.union(c.ids(source, dim, picked), c.ids(target, dim))
    if _is_permutation(picked, c.shape(source)[dim]) and trace.nodes[index_node].kind == BUFFER:
        c.follow_index(index_node, target, dim)  # a buffer the engine renumbers (e.g. a channel shuffle)
        return
    c.pin(source, dim, "index_select indices are fixed")


def _is_permutation(picked: np.ndarray, size: int) -> bool:
    return picked.size == size and np.array_equal(np.sort(picked), np.arange(size))


@op_rule(aten.flip, aten.roll, aten.cumsum, aten.cumprod, aten.sort, aten.argsort, aten.topk)
def along_dims_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    """Ops that mix indices along some dims and keep the others: couple the others, pin the rest."""
    source = op.inputs[0]
    ndim = len(c.shape(source))
    dims = op.arg(1, "dims", op.arg(1, "dim", -1)) if op.func.overloadpacket is not aten.roll else op.arg(2, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or range(ndim))
    dims = {norm_dim(d, ndim) for d in dims}
    for out in op.outputs:
        for d in range(min(ndim, len(c.shape(out)))):
            if d in dims:
                c.pin(source, d, f"{op.name} mixes indices along this dimension")
                c.pin(out, d, f"{op.name} mixes indices along this dimension")
            else:
                c.same(source, d, out, d)


@op_rule(aten.index)
def index_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    """Advanced indexing ``x[idx0, idx1, ...]``: indexed leading dims are data-dependent (pinned);
    the dims after them pass through unchanged."""
    source, out = op.inputs[0], op.outputs[0]
    indices = op.arg(1, "indices") or []
    k = len(indices)
    if any(i is None for i in indices):
        raise ValueError("indexing with None gaps")
    for d in range(k):
        c.pin(source, d, "advanced indexing")
    src_ndim, out_ndim = len(c.shape(source)), len(c.shape(out))
    for d in range(k, src_ndim):
        c.same(source, d, out, out_ndim - (src_ndim - d))
    for d in range(out_ndim - (src_ndim - k)):
        c.pin(out, d, "advanced indexing")
