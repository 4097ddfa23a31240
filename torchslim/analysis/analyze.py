"""``analyze``: where the parameters, MACs, activation memory and time of a model go.

MACs come from the same traced graph the pruner uses (see ``torchslim.graph.macs`` for the
counting convention), attributed to the innermost module that issued each op and summed
up the module tree. Latency is measured, not modelled: whole model and per module via
forward hooks, with warm-up, repeats and medians.
"""
from __future__ import annotations

import io
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from torchslim._inputs import ExampleInputs, call_model, input_tensors
from torchslim._timing import fixed_threads, measure_latency
from torchslim.analysis.report import AnalysisReport, LayerRow
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import has_macs, op_macs


def analyze(model: nn.Module, example_inputs: ExampleInputs, *, latency: bool = True, warmup: int = 3,
            repeats: int = 10, threads: int | None = None) -> AnalysisReport:
    """Per-module params, MACs, output shapes, activation bytes and measured latency.

    Runs under ``no_grad`` in eval mode; the model's training flags and weights are restored.
    """
    graph = DependencyGraph.build(model, example_inputs)
    macs = _macs_by_module(graph)
    rows = []
    for name, module in model.named_modules():
        calls = graph.trace.module_calls.get(name, [])
        outputs = [graph.trace.nodes[n] for call in calls for n in call.outputs]
        rows.append(LayerRow(
            name=name,
            type=type(module).__name__,
            params=sum(p.numel() for p in module.parameters()),
            macs=macs.get(name, 0),
            output_shape=[list(node.shape) for node in outputs[: max(1, len(outputs) // max(len(calls), 1))]],
            activation_bytes=sum(_numel(node.shape) * node.itemsize for node in outputs),
            is_leaf=not any(True for _ in module.children()),
            calls=len(calls),
        ))
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    report = AnalysisReport(
        model=type(model).__name__, layers=rows, total_params=sum(p.numel() for p in model.parameters()),
        total_macs=macs.get("", 0), state_dict_bytes=state_bytes, disk_bytes=buffer.tell(),
        latency_ms=None, latency_p10_ms=None, latency_p90_ms=None, threads=None,
        input_shapes=[list(t.shape) for t in input_tensors(example_inputs)],
    )
    if latency:
        _measure(model, example_inputs, report, warmup, repeats, threads)
    return report


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _macs_by_module(graph: DependencyGraph) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    shapes = lambda n: graph.trace.nodes[n].shape  # noqa: E731
    for op in graph.trace.ops:
        if not has_macs(op):
            continue
        value = op_macs(op, shapes)
        parts = op.module.split(".") if op.module else []
        totals[""] += value
        for i in range(1, len(parts) + 1):
            totals[".".join(parts[:i])] += value
    return totals


def _measure(model, example_inputs, report: AnalysisReport, warmup: int, repeats: int, threads: int | None) -> None:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        stats = measure_latency(lambda: call_model(model, example_inputs), warmup=warmup, repeats=repeats, threads=threads)
        report.latency_ms, report.latency_p10_ms, report.latency_p90_ms = stats.median_ms, stats.p10_ms, stats.p90_ms
        report.threads = stats.threads
        per_module = _per_module_latency(model, example_inputs, max(3, repeats // 2), threads)
        for row in report.layers:
            if row.name in per_module:
                row.latency_ms = per_module[row.name]
                row.latency_share = per_module[row.name] / stats.median_ms if stats.median_ms else None
        root = report.layers[0]
        root.latency_ms, root.latency_share = stats.median_ms, 1.0
    finally:
        for m, flag in flags.items():
            m.training = flag


def _per_module_latency(model, example_inputs, repeats: int, threads: int | None) -> dict[str, float]:
    """Median time inside each module's forward (children included) over ``repeats`` runs."""
    samples: dict[str, list[float]] = defaultdict(list)
    starts: dict[int, list[float]] = defaultdict(list)
    names = {id(m): n for n, m in model.named_modules()}
    handles = []
    for module in model.modules():
        if names.get(id(module)) == "":
            continue
        handles.append(module.register_forward_pre_hook(lambda m, i: starts[id(m)].append(time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, i, o: run_totals.__setitem__(names[id(m)], run_totals.get(names[id(m)], 0.0)
                                                    + time.perf_counter() - starts[id(m)].pop())))
    try:
        with fixed_threads(threads), torch.no_grad():
            for _ in range(repeats):
                run_totals: dict[str, float] = {}
                call_model(model, example_inputs)
                for name, seconds in run_totals.items():
                    samples[name].append(seconds * 1000.0)
    finally:
        for h in handles:
            h.remove()
    return {name: statistics.median(values) for name, values in samples.items()}
