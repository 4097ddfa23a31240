"""A per-layer latency lookup table, measured on this machine and runtime (NetAdapt's approach).

Each convolution or matrix product of the traced graph is a *layer spec* (kind, kernel,
stride, groups mode, input size, bias or not: a 1x1 conv with a bias takes 1.6x as long at
batch 8 in eager PyTorch, and most convs before a BatchNorm have none); the table maps
``(spec, in_channels, out_channels)`` to the median latency of that layer alone, measured
once with warm-up and repeats and cached as JSON under ``~/.cache/torchslim/`` (override
with ``TORCHSLIM_CACHE``) per machine, runtime (PyTorch eager, or ONNX Runtime with the
layer exported alone) and thread count.
Summed over the graph's layers, plus the measured remainder of the model (everything the
table does not model), it predicts the latency of any pruning of the graph without
building it. ``CostModel`` estimates the same from shapes alone (no measurement), for the
default MACs-target ranking.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.graph import DependencyGraph
from torchslim.graph import OpCall, conv_args
from torchslim.graph.macs import has_macs, op_macs
from torchslim.latency.runtime import RUNTIMES, measure_model

aten = torch.ops.aten


def cache_dir() -> Path:
    return Path(os.environ.get("TORCHSLIM_CACHE", Path.home() / ".cache" / "torchslim"))


def machine_key(runtime: str, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    raw = f"{platform.node()}|{cpu}|{os.cpu_count()}|{torch.__version__}|{runtime}|{threads}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


# A layer timed while other work held the CPU stays slow in the cache for good (seen: ResNet-18's
# 512x512 3x3 conv cached at 8.9 ms, 3.5 ms when re-timed, so one channel less "saved" 60%).
# Neighbouring widths do about the same work, so when two entries within NEIGHBOUR_WIDTH of each
# other differ in time per MAC by more than SUSPICIOUS_RATIO, both are timed again and the
# faster of each pair of measurements kept.
NEIGHBOUR_WIDTH = 0.03
SUSPICIOUS_RATIO = 1.5


class LatencyTable:
    """Measured latency of single layers at given widths, cached on disk."""

    def __init__(self, runtime: str = "torch", threads: int = 1, repeats: int = 15, path: Path | None = None):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.runtime, self.threads, self.repeats = runtime, threads, repeats
        self.path = path or cache_dir() / f"latency-{runtime}-{machine_key(runtime, threads)}.json"
        self.entries: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._dirty = False
        self._widths: dict[str, set[tuple[int, int]]] = {}  # spec (as JSON) -> widths in the table
        for key in self.entries:
            spec, cin, cout = json.loads(key)
            self._widths.setdefault(json.dumps(spec), set()).add((cin, cout))
        self._rechecked: set[str] = set()  # timed again in this session: not again
        self._compared: set[str] = set()  # compared with its neighbours in this session

    def lookup(self, spec: tuple, cin: int, cout: int) -> float:
        key = _key(spec, cin, cout)
        if key not in self.entries:
            self.entries[key] = self._measure(spec, cin, cout)
            self._dirty = True
            self._widths.setdefault(json.dumps(list(spec)), set()).add((cin, cout))
        if key not in self._compared:  # once per table object: a cached entry is compared too
            self._compared.add(key)
            self._recheck_neighbours(spec, cin, cout)
        return self.entries[key]

    def _recheck_neighbours(self, spec: tuple, cin: int, cout: int) -> None:
        """Time again an entry whose time per MAC disagrees with a new neighbour's (see SUSPICIOUS_RATIO)."""
        mine = self.entries[_key(spec, cin, cout)] / (cin * cout)
        for other_cin, other_cout in list(self._widths.get(json.dumps(list(spec)), ())):
            near = abs(other_cin - cin) <= max(1, NEIGHBOUR_WIDTH * cin) and \
                abs(other_cout - cout) <= max(1, NEIGHBOUR_WIDTH * cout)
            other_key = _key(spec, other_cin, other_cout)
            if not near or (other_cin, other_cout) == (cin, cout) or other_key in self._rechecked:
                continue
            theirs = self.entries[other_key] / (other_cin * other_cout)
            if max(mine, theirs) > SUSPICIOUS_RATIO * min(mine, theirs):
                for c_in, c_out in ((cin, cout), (other_cin, other_cout)):
                    key = _key(spec, c_in, c_out)
                    self.entries[key] = min(self.entries[key], self._measure(spec, c_in, c_out))
                    self._rechecked.add(key)
                    self._dirty = True
                mine = self.entries[_key(spec, cin, cout)] / (cin * cout)

    def save(self) -> None:
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.entries))
            self._dirty = False

    def _measure(self, spec: tuple, cin: int, cout: int) -> float:
        layer, x = _instantiate(spec, cin, cout)  # alone; for ONNX Runtime exported alone and run there
        return measure_model(layer, (x,), runtime=self.runtime, threads=self.threads, warmup=3,
                             repeats=self.repeats).median_ms


def _key(spec: tuple, cin: int, cout: int) -> str:
    return json.dumps([list(spec), cin, cout])


def _instantiate(spec: tuple, cin: int, cout: int) -> tuple[nn.Module, torch.Tensor]:
    kind = spec[0]
    if kind == "conv":
        _, dims, kernel, stride, padding, dilation, depthwise, groups, transposed, batch, spatial, bias = spec
        g = cin if depthwise else groups
        cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims] if transposed else \
            {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        layer = cls(cin, cout, kernel, stride, padding, dilation=dilation, groups=g, bias=bias)
        return layer, torch.randn(batch, cin, *spatial)
    _, rows, bias = spec
    return nn.Linear(cin, cout, bias=bias), torch.randn(rows, cin)


def layer_spec(graph: DependencyGraph, op: OpCall, weight_views: set[int]) -> tuple | None:
    """(spec, in-channel (node, dim), out-channel (node, dim)) for convs and weight products."""
    packet = op.func.overloadpacket
    nodes = graph.trace.nodes
    if packet is aten.convolution:
        x, w, out = op.inputs[0], op.inputs[1], op.outputs[0]
        shape = nodes[x].shape
        args = conv_args(op)
        depthwise = args.depthwise(shape[1])
        spec = ("conv", len(shape) - 2, tuple(nodes[w].shape[2:]), tuple(args.stride), tuple(args.padding),
                tuple(args.dilation), depthwise, 1 if depthwise else args.groups, args.transposed, shape[0],
                tuple(shape[2:]), args.has_bias)
        return spec, (x, 1), (out, 1)
    if packet in (aten.addmm, aten.mm):
        a, b = (op.inputs[1], op.inputs[2]) if packet is aten.addmm else (op.inputs[0], op.inputs[1])
        if b in weight_views:  # x @ W.t(): a Linear layer
            return ("linear", nodes[a].shape[0], packet is aten.addmm), (a, 1), (op.outputs[0], 1)
    return None


def _weight_views(graph: DependencyGraph) -> set[int]:
    transposes = (aten.t, aten.transpose, aten.permute)
    return {op.outputs[0] for op in graph.trace.ops
            if op.func.overloadpacket in transposes and graph.trace.nodes[op.inputs[0]].kind == "param"}


class LatencyModel:
    """Predicts whole-model latency for any removal: table layers + the measured remainder."""

    def __init__(self, graph: DependencyGraph, example_inputs, table: LatencyTable | None = None,
                 measured_ms: float | None = None):
        self.graph = graph
        self.table = table or LatencyTable()
        views = _weight_views(graph)
        self.layers = [s for s in (layer_spec(graph, op, views) for op in graph.trace.ops) if s is not None]
        if measured_ms is None:
            measured_ms = measure_model(graph.model, example_inputs, runtime=self.table.runtime, warmup=3,
                                        repeats=15, threads=self.table.threads).median_ms
        self.measured_ms = measured_ms
        self.layer_scale = 1.0
        alone = self.predict_layers(None)
        if alone > measured_ms > 0:  # layers timed alone (noisy, cache-hot) can add up past the whole
            self.layer_scale = measured_ms / alone
        self.layers_ms = alone * self.layer_scale
        self.rest_ms = max(measured_ms - self.layers_ms, 0.0)
        self._acts = [n.index for n in graph.trace.nodes if n.kind == "act"]
        self.act_elements = self._activation_elements(np.zeros(graph.n_atoms, dtype=bool))

    def _mask(self, removed_atoms) -> np.ndarray:
        removed = np.zeros(self.graph.n_atoms, dtype=bool)
        if removed_atoms is not None and len(removed_atoms):
            removed[np.asarray(removed_atoms, dtype=np.int64)] = True
        return removed

    def _activation_elements(self, removed: np.ndarray) -> int:
        shapes = self.graph.shapes_after(removed)
        return sum(int(np.prod(shapes[n])) for n in self._acts)

    def predict_layers(self, removed_atoms: np.ndarray | None, only: np.ndarray | None = None) -> float:
        """Table latency of the conv/linear layers (``only``: just those touching these atoms),
        scaled down where the layers timed alone add up to more than the measured model."""
        removed = self._mask(removed_atoms)
        labels, c = self.graph.labels, self.graph.coupling
        shapes = self.graph.shapes_after(removed)
        total = 0.0
        for spec, (x, xd), (out, od) in self.layers:
            if only is not None and not (np.isin(labels[c.ids(x, xd)], only).any()
                                         or np.isin(labels[c.ids(out, od)], only).any()):
                continue
            cin, cout = shapes[x][xd], shapes[out][od]
            total += self.table.lookup(spec, max(cin, 1), max(cout, 1))
        self.table.save()
        return total * self.layer_scale

    def predict(self, removed_atoms: np.ndarray | None = None) -> float:
        """Predicted latency (ms) after removing ``removed_atoms``: table layers plus the rest of
        the model (elementwise ops, norms, pooling), scaled by the activation volume left."""
        removed = self._mask(removed_atoms)
        rest = self.rest_ms * self._activation_elements(removed) / max(self.act_elements, 1)
        return rest + self.predict_layers(removed_atoms)


# Eager PyTorch on a CPU, per kind of op (oneDNN/MKL kernels, float32, batch 1), measured on a
# 2-core x86 VM at 1 thread: dense convolutions and matrix products run at 20-32 GMAC/s (a 1x1
# conv 16 -> 96 channels at 17: THIN_CHANNELS), depthwise convolutions at ~7 (each input element
# is used k*k times, not k*k*C), and elementwise ops (BatchNorm, activations, adds, pooling,
# copies) move 3-6 G elements/s read plus written, for ~5 us per op. Absolute values differ
# between machines; the selection uses only what one channel saves relative to another, which
# these ratios carry (per-module shares of MODNet's time: estimated within ~20% of measured).
DENSE_MACS_PER_US = 25_000.0
DEPTHWISE_MACS_PER_US = 7_000.0
ELEMENTS_PER_US = 2_000.0  # inputs read plus outputs written
OP_OVERHEAD_US = 5.0
THIN_CHANNELS = 8.0
_COMPUTE = {aten.convolution, aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.matmul,
            aten._scaled_dot_product_flash_attention_for_cpu, aten.scaled_dot_product_attention,
            aten._native_multi_head_attention}
_VIEWS = {aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t, aten.expand,
          aten.squeeze, aten.unsqueeze, aten.slice, aten.select, aten.alias, aten.detach, aten.as_strided,
          aten.split, aten.split_with_sizes, aten.unbind, aten.chunk, aten.flatten, aten.unflatten, aten.narrow,
          aten.lift_fresh, aten._reshape_alias}


class CostModel:
    """Latency estimated from shapes alone, no measurement: per traced op, a fixed cost, its
    MACs at the throughput of its kind (dense or depthwise) and the activation elements it
    reads and writes at memory speed (roofline-style, as in NetAdapt's and MobileNet's
    discussions of memory-bound layers).

    Its ``predict`` answers like :class:`LatencyModel`'s, in estimated milliseconds, so the
    rankings that spend a MACs budget where the time is can run without a table measured on
    this machine: a channel at 112x112 moves 256 times the elements of one at 7x7, a depthwise
    MAC costs ~4 dense ones, and a product over few channels runs slower per MAC than a wide
    one (``_thin_penalty``), so cutting a layer very thin saves less than its MACs."""

    def __init__(self, graph: DependencyGraph):
        self.graph = graph
        self._macs: dict[tuple, int] = {}  # (op index, shapes) -> MACs
        nodes = graph.trace.nodes
        self._ops = []  # (op, activation nodes it reads and writes, MACs per us or 0 for none)
        for op in graph.trace.ops:
            packet = op.func.overloadpacket
            if packet in _VIEWS:
                continue
            acts = [n for n in (*op.inputs, *op.outputs) if nodes[n].kind in ("act", "input")]
            if not op.outputs or not acts:
                continue
            speed = 0.0
            if packet in _COMPUTE and has_macs(op):
                speed = DEPTHWISE_MACS_PER_US if _is_depthwise(op, nodes) else DENSE_MACS_PER_US
            self._ops.append((op, acts, speed))
        self.unpruned_ms = self.predict()

    def predict(self, removed_atoms: np.ndarray | None = None) -> float:
        """Estimated latency (ms) after removing ``removed_atoms``."""
        removed = np.zeros(self.graph.n_atoms, dtype=bool)
        if removed_atoms is not None and len(removed_atoms):
            removed[np.asarray(removed_atoms, dtype=np.int64)] = True
        shapes = self.graph.shapes_after(removed) if removed.any() else [n.shape for n in self.graph.trace.nodes]
        memo = self._macs
        total_us = 0.0
        for op, acts, speed in self._ops:
            elements = sum(int(np.prod(shapes[n])) for n in acts)
            total_us += OP_OVERHEAD_US + elements / ELEMENTS_PER_US
            if speed:
                key = (op.index, *(shapes[n] for n in op.inputs), *(shapes[n] for n in op.outputs))
                if key not in memo:
                    memo[key] = op_macs(op, shapes.__getitem__)
                total_us += memo[key] / speed * _thin_penalty(op, shapes)
        return total_us / 1000.0


def _thin_penalty(op: OpCall, shapes) -> float:
    """How much slower per MAC a product over few channels runs: vector registers and blocked
    layouts are filled ``THIN_CHANNELS`` at a time, and the per-call work (packing, threading)
    does not shrink with the channels. ``(1 + T/cin) * (1 + T/cout)``; depthwise convs only pay
    the output term."""
    packet = op.func.overloadpacket
    if packet is aten.convolution:
        cin, cout = shapes[op.inputs[0]][1], shapes[op.outputs[0]][1]
        args = conv_args(op)
        if args.depthwise(cin):
            return 1.0 + THIN_CHANNELS / max(cout, 1)
        cin //= max(args.groups, 1)
    elif packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
        first = 1 if packet in (aten.addmm, aten.baddbmm) else 0
        cin, cout = shapes[op.inputs[first]][-1], shapes[op.outputs[0]][-1]
    else:
        return 1.0
    return (1.0 + THIN_CHANNELS / max(cin, 1)) * (1.0 + THIN_CHANNELS / max(cout, 1))


def _is_depthwise(op: OpCall, nodes) -> bool:
    if op.func.overloadpacket is not aten.convolution:
        return False
    return conv_args(op).depthwise(nodes[op.inputs[0]].shape[1])
