"""The index space of channel coupling.

Every index of every dimension of every traced tensor is one *element*
``(node, dim, index)``. Op rules declare which elements must be removed together
(``union``), which may never be removed (``pin``: model inputs/outputs, unknown ops,
vocabularies) and which feed a statistic over the dimension (``mark_inexact``:
removing them changes, e.g., LayerNorm's mean, so the pruned model is not equal to
the zeroed original there). The connected components of the union edges are the
*atoms*: the smallest sets of indices that can be removed while keeping every op valid.
Components are found by a vectorised union-find (:func:`connected_components`), so building
the graph stays close to linear in the number of elements, without importing scipy (0.25 s of
the first ``prune_`` in a process).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from torchslim.graph._trace import TensorNode


@dataclasses.dataclass
class PinReason:
    node: int
    dim: int | None
    reason: str


class Coupling:
    """Collects unions, pins and inexact marks over the elements of a traced graph."""

    def __init__(self, nodes: list[TensorNode], digit_choices: dict | None = None):
        self.nodes = nodes
        # reshape chunks whose coupled digit was overridden: (op index, chunk) -> candidate rank
        self.digit_choices: dict[tuple[int, int], int] = dict(digit_choices or {})
        # per split/merge chunk: (key, dims covering each candidate digit, in preference order)
        self.reshape_choices: list[tuple[tuple[int, int], list[list[tuple[int, int]]]]] = []
        self.hints: list[np.ndarray] = []
        # slots: one per (node, dim), in element order; a slot's elements are one contiguous range
        self.slot_sizes = np.fromiter((s for node in nodes for s in node.shape), dtype=np.int64)
        self.slot_starts = np.cumsum(self.slot_sizes) - self.slot_sizes
        self.first_slot = np.cumsum([0] + [node.ndim for node in nodes])  # each node's first slot
        # first element id of every (node, dim)
        self.offsets: list[np.ndarray] = np.split(self.slot_starts, self.first_slot[1:-1]) if nodes else []
        total = int(self.slot_sizes.sum())
        self.size = total
        self.pinned = np.zeros(total, dtype=bool)
        self.inexact = np.zeros(total, dtype=bool)
        self.pin_reasons: list[PinReason] = []
        self.inexact_reasons: list[PinReason] = []
        self._left: list[np.ndarray] = []
        self._right: list[np.ndarray] = []
        self._chosen: list[int] = []  # positions in _left/_right of unions made by a reshape's digit choice
        # ``same`` edges as (first id of a, first id of b, length): one tuple instead of two
        # aranges for the commonest declaration, expanded at once in ``edges``
        self._ranges: list[tuple[int, int, int]] = []
        self._components: tuple[tuple[int, int], tuple[int, np.ndarray]] | None = None  # (edge mark, result)
        # index buffers that permute a dim: buffer node -> (the tensor it picks into, that dim)
        self.index_buffers: dict[int, tuple[int, int]] = {}

    # element addressing -------------------------------------------------
    def shape(self, node: int) -> tuple[int, ...]:
        return self.nodes[node].shape

    def ids(self, node: int, dim: int, index: np.ndarray | None = None) -> np.ndarray:
        """Global element ids of ``node``'s dimension ``dim`` (all indices, or the given ones)."""
        dim = _norm_dim(dim, self.nodes[node].ndim)
        start = self.offsets[node][dim]
        if index is None:
            return np.arange(start, start + self.nodes[node].shape[dim], dtype=np.int64)
        return start + np.asarray(index, dtype=np.int64)

    # declarations -------------------------------------------------------
    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Elements ``a[i]`` and ``b[i]`` must be removed together."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        if a.size:
            self._left.append(a)
            self._right.append(b if b.shape == a.shape else np.broadcast_to(b, a.shape).astype(np.int64))

    def union_by_choice(self, a: np.ndarray, b: np.ndarray) -> None:
        """A union that holds only under one reshape's choice of coupled digit (the graph may
        revise that choice, see ``structural_components``)."""
        self._chosen.append(len(self._left))
        self.union(a, b)

    def edge_count(self) -> tuple[int, int]:
        """A mark in the declarations, for ``touched_since``."""
        return len(self._left), len(self._ranges)

    def touched_since(self, mark: tuple[int, int]) -> np.ndarray:
        """Elements named by unions declared after ``mark`` (repeats kept)."""
        left, right = self._expand(self._left[mark[0]:], self._right[mark[0]:], self._ranges[mark[1]:])
        return np.concatenate((left, right))

    def same(self, node_a: int, dim_a: int, node_b: int, dim_b: int) -> None:
        """Index ``i`` of ``node_a.dim_a`` is index ``i`` of ``node_b.dim_b`` (equal sizes required)."""
        dim_a, dim_b = _norm_dim(dim_a, self.nodes[node_a].ndim), _norm_dim(dim_b, self.nodes[node_b].ndim)
        size_a, size_b = self.nodes[node_a].shape[dim_a], self.nodes[node_b].shape[dim_b]
        if size_a != size_b:
            self.pin(node_a, dim_a, f"size mismatch {size_a} vs {size_b}")
            self.pin(node_b, dim_b, f"size mismatch {size_a} vs {size_b}")
            return
        if size_a:
            self._ranges.append((int(self.offsets[node_a][dim_a]), int(self.offsets[node_b][dim_b]), size_a))

    def same_all(self, node_a: int, node_b: int) -> None:
        """Two tensors of equal shape whose indices correspond one to one in every dim."""
        for d in range(self.nodes[node_a].ndim):
            self.same(node_a, d, node_b, d)

    def follow_index(self, index: int, target: int, dim: int) -> None:
        """Buffer ``index`` holds a permutation that picks ``target``'s ``dim`` from its source:
        removing channels slices it and renumbers its values instead of pinning the dim. Used
        again on another tensor, the two picks stay coupled so that one renumbering serves both."""
        if index in self.index_buffers:
            self.same(*self.index_buffers[index], target, dim)
        else:
            self.index_buffers[index] = (target, dim)

    def pin(self, node: int, dim: int | None = None, reason: str = "") -> None:
        for d in self._dims(node, dim):
            self.pinned[self.ids(node, d)] = True
        self.pin_reasons.append(PinReason(node, dim, reason))

    def held_by(self, reasons: tuple[str, ...]) -> np.ndarray:
        """Elements pinned for one of ``reasons`` (e.g. the model's inputs and outputs)."""
        ids = [self.ids(p.node, d) for p in self.pin_reasons if p.reason in reasons for d in self._dims(p.node, p.dim)]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def _dims(self, node: int, dim: int | None) -> range | list[int]:
        return range(self.nodes[node].ndim) if dim is None else [dim]

    def pin_elements(self, ids: np.ndarray) -> None:
        self.pinned[np.asarray(ids, dtype=np.int64)] = True

    def hint(self, node: int, dim: int) -> None:
        """Declare ``node.dim`` a natural pruning unit (e.g. attention heads): a reshape that
        splits or merges it couples by this dimension rather than its default choice."""
        self.hints.append(self.ids(node, dim))

    def mark_inexact(self, node: int, dim: int, reason: str) -> None:
        self.inexact[self.ids(node, dim)] = True
        self.inexact_reasons.append(PinReason(node, dim, reason))

    # result -------------------------------------------------------------
    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Every union edge as two aligned arrays of element ids."""
        return self._expand(self._left, self._right, self._ranges)

    @staticmethod
    def _expand(left: list[np.ndarray], right: list[np.ndarray],
                ranges: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        if ranges:
            starts_a, starts_b, sizes = np.asarray(ranges, dtype=np.int64).T
            within = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            left = left + [np.repeat(starts_a, sizes) + within]
            right = right + [np.repeat(starts_b, sizes) + within]
        if not left:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(left), np.concatenate(right)

    def components(self) -> tuple[int, np.ndarray]:
        """Label every element with its atom (connected component); computed once per set of
        unions (the reshape revision and the graph both ask for the same coupling's)."""
        mark = self.edge_count()
        if self._components is None or self._components[0] != mark:
            self._components = (mark, self._connected(*self.edges()))
        return self._components[1]

    def structural_components(self) -> tuple[int, np.ndarray]:
        """Components without the unions of reshape digit choices: what holds whichever digit
        each split/merge couples by (e.g. whether a digit is a broadcast copy or the input's batch)."""
        chosen = set(self._chosen)
        keep = [i for i in range(len(self._left)) if i not in chosen]
        return self._connected(*self._expand([self._left[i] for i in keep], [self._right[i] for i in keep], self._ranges))

    def _connected(self, left: np.ndarray, right: np.ndarray) -> tuple[int, np.ndarray]:
        return connected_components(self.size, left, right)


def connected_components(n: int, left: np.ndarray, right: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of the undirected graph on ``n`` vertices with edges
    ``left[i] - right[i]``: ``(count, label per vertex)``, labels numbered in the order of each
    component's smallest vertex (as scipy.sparse.csgraph numbers them).

    Union-find in whole-array steps: every root joined by an edge to a smaller root is hooked
    under it, then paths are compressed by pointer jumping; each round at least halves the roots
    that still have edges, and every vertex's parent is never above itself, so no cycle forms.
    """
    index = np.int32 if n < 2**31 else np.int64  # half the temporaries' memory on any real model
    parent = np.arange(n, dtype=index)
    left, right = np.asarray(left, dtype=index), np.asarray(right, dtype=index)
    while left.size:
        a, b = parent[left], parent[right]
        low, high = np.minimum(a, b), np.maximum(a, b)
        joins = low != high
        if not joins.any():
            break
        left, right = left[joins], right[joins]
        parent[high[joins]] = low[joins]  # any smaller root will do when a root has several
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    rank = np.cumsum(parent == np.arange(n, dtype=index)) - 1  # roots are each component's smallest vertex
    return (int(rank[-1]) + 1 if n else 0), rank[parent].astype(np.int64)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim
