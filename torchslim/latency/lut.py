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
building it.
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
from torchslim.graph import OpCall
from torchslim.latency.runtime import RUNTIMES, measure_model

aten = torch.ops.aten


def cache_dir() -> Path:
    return Path(os.environ.get("TORCHSLIM_CACHE", Path.home() / ".cache" / "torchslim"))


def machine_key(runtime: str, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    raw = f"{platform.node()}|{cpu}|{os.cpu_count()}|{torch.__version__}|{runtime}|{threads}"
    return hashlib.sha1(raw.encode()).hexdigest()[:12]


class LatencyTable:
    """Measured latency of single layers at given widths, cached on disk."""

    def __init__(self, runtime: str = "torch", threads: int = 1, repeats: int = 15, path: Path | None = None):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.runtime, self.threads, self.repeats = runtime, threads, repeats
        self.path = path or cache_dir() / f"latency-{runtime}-{machine_key(runtime, threads)}.json"
        self.entries: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._dirty = False

    def lookup(self, spec: tuple, cin: int, cout: int) -> float:
        key = json.dumps([list(spec), cin, cout])
        if key not in self.entries:
            self.entries[key] = self._measure(spec, cin, cout)
            self._dirty = True
        return self.entries[key]

    def save(self) -> None:
        if self._dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.entries))
            self._dirty = False

    def _measure(self, spec: tuple, cin: int, cout: int) -> float:
        layer, x = _instantiate(spec, cin, cout)  # alone; for ONNX Runtime exported alone and run there
        return measure_model(layer, (x,), runtime=self.runtime, threads=self.threads, warmup=3,
                             repeats=self.repeats).median_ms


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
        groups = op.arg(8, "groups", 1)
        transposed = bool(op.arg(6, "transposed", False))
        depthwise = groups > 1 and groups == shape[1]
        spec = ("conv", len(shape) - 2, tuple(nodes[w].shape[2:]), tuple(op.arg(3, "stride")),
                tuple(op.arg(4, "padding")), tuple(op.arg(5, "dilation")), depthwise, 1 if depthwise else groups,
                transposed, shape[0], tuple(shape[2:]), op.arg(2, "bias") is not None)
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
