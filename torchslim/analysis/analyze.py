"""``analyze``: where the parameters, MACs, activation memory and time of a model go.

One forward pass under ``torch.utils.flop_counter.FlopCounterMode`` (with the extra
formulas and the convention of :mod:`torchslim.graph.macs`) gives every module's MACs,
output shapes and activation bytes; latency is measured, not modelled, in rounds: each round
times the whole model (median, p10, p90 of repeated runs), then every module with forward
hooks (medians), and the least-disturbed round is reported, so a burst of other work on the
machine lands on one round instead of on the figure (rounds that disagree are warned about).
Everything runs under ``torch.no_grad`` in eval mode; the model's training flags and buffers
are restored afterwards and its parameters are never written.
"""
from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from torchslim._inputs import ExampleInputs, call_model, input_tensors, normalize_inputs
from torchslim._timing import LatencyStats, ModuleTiming, measure_latency, module_latency, warn_if_rounds_disagree
from torchslim.analysis._profile import profile_macs
from torchslim.analysis.report import AnalysisReport, LayerRow
from torchslim.modes import training_mode


def analyze(model: nn.Module, example_inputs: ExampleInputs, *, latency: bool = True, warmup: int = 3,
            repeats: int = 5, threads: int | None = 1, rounds: int = 3) -> AnalysisReport:
    """Per-module params, MACs, output shapes, activation bytes and measured latency.

    Args:
        model: any ``nn.Module``; it is called as ``model(*args, **kwargs)``.
        example_inputs: a tensor, a tuple of positional inputs, or ``(args, kwargs)``
            (e.g. ``((img,), {"inference": True})``). Outputs may be anything (tensors,
            tuples, dicts, dataclasses, ``None``).
        latency: measure latency (whole model and per module). ``False`` runs the model once.
        warmup, repeats: untimed runs before timing, and timed runs per round for the
            whole model and again for the per-module pass (hooked, so slower).
        threads: torch intra-op threads while timing (``None``: torch's current count), reported
            and restored afterwards. One by default, as for every latency torchslim measures:
            with as many threads as cores, any other busy process stalls every parallel op (a
            0.3 ms CNN measured 80 ms at 2 threads on 2 busy cores, 0.1-0.3 ms at 1 thread).
        rounds: timing rounds; the round with the lowest whole-model median is reported
            (with its per-module times) and every round's median is in ``latency_rounds_ms``.

    The model runs in eval mode under ``torch.no_grad``; training flags and buffers are
    restored afterwards, parameters and ``requires_grad`` are never touched.
    """
    normalize_inputs(example_inputs)  # reject unsupported input forms before touching the model
    was_training = model.training
    with training_mode(model, False), _preserved_buffers(model), torch.no_grad():
        profile, _ = profile_macs(model, example_inputs)
        timing = stats = None
        if latency:
            stats, timing = _timed_in_rounds(model, lambda: call_model(model, example_inputs), warmup, repeats,
                                             threads, rounds)

    names = [name for name, _ in model.named_modules()]
    modules = dict(model.named_modules())
    self_params: dict[str, int] = dict.fromkeys(names, 0)
    for pname, param in model.named_parameters():
        self_params[pname.rpartition(".")[0]] += param.numel()
    params = _subtree_sums(names, self_params)
    self_macs = {name: (profile.modules[name].self_macs if name in profile.modules else 0) for name in names}
    macs = _subtree_sums(names, self_macs)

    rows = []
    for name in names:
        module = modules[name]
        record = profile.modules.get(name)
        row = LayerRow(
            name=name, type=type(module).__name__, params=params[name], macs=macs[name],
            output_shape=record.output_shape if record else [],
            activation_bytes=record.activation_bytes if record else 0,
            is_leaf=next(iter(module.children()), None) is None, calls=record.calls if record else 0,
            self_params=self_params[name], self_macs=self_macs[name],
        )
        if stats is not None and timing is not None and name in timing:
            row.latency_ms = timing[name].median_ms
            row.self_latency_ms = timing[name].self_median_ms
            row.latency_share = row.latency_ms / stats.median_ms if stats.median_ms else None
        rows.append(row)
    if stats is not None:  # the root's own latency is the un-hooked whole-model measurement
        rows[0].latency_ms, rows[0].latency_share = stats.median_ms, 1.0

    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return AnalysisReport(
        model=type(model).__name__, layers=rows, total_params=sum(self_params.values()), total_macs=profile.total,
        state_dict_bytes=_unique_bytes(state.values()), disk_bytes=buffer.tell(),
        latency_ms=stats.median_ms if stats else None, latency_p10_ms=stats.p10_ms if stats else None,
        latency_p90_ms=stats.p90_ms if stats else None, threads=stats.threads if stats else None,
        input_shapes=[list(t.shape) for t in input_tensors(example_inputs)],
        macs_by_op=dict(sorted(profile.by_op.items(), key=lambda kv: -kv[1])),
        latency_runs=stats.runs if stats else None, training=was_training,
        latency_rounds_ms=stats.round_medians_ms if stats else None,
    )


def _timed_in_rounds(model: nn.Module, run, warmup: int, repeats: int, threads: int | None,
                     rounds: int) -> tuple[LatencyStats, dict[str, ModuleTiming]]:
    """Per round, the whole model's latency then the per-module times; the round with the
    lowest whole-model median is kept (its module times were measured next to it), the others'
    medians are recorded and a warning says when they disagree."""
    from torchslim.latency.runtime import best_of_rounds

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    warmups = [warmup]  # the first round warms the model up; later rounds find it warm

    def one_round() -> tuple[LatencyStats, dict[str, ModuleTiming]]:
        stats = measure_latency(run, warmup=warmups.pop() if warmups else 0, repeats=repeats, threads=threads)
        return stats, module_latency(model, run, warmup=0, repeats=repeats, threads=threads)

    history: dict[str, list] = {}
    stats, timing = best_of_rounds({"model": one_round}, rounds, key=lambda r: r[0].median_ms,
                                   history=history)["model"]
    stats.round_medians_ms = [s.median_ms for s, _ in history["model"]]
    warn_if_rounds_disagree(type(model).__name__, stats, stacklevel=4)
    return stats, timing


def _subtree_sums(names: list[str], own: dict[str, int]) -> dict[str, int]:
    """Each module's value plus its descendants' (by qualified-name prefix)."""
    totals = dict.fromkeys(names, 0)
    for name, value in own.items():
        if not value:
            continue
        totals[""] += value
        parts = name.split(".") if name else []
        for i in range(1, len(parts) + 1):
            totals[".".join(parts[:i])] += value
    return totals


def _unique_bytes(tensors) -> int:
    """Bytes of the distinct tensors (a tensor registered under two names counts once)."""
    seen: set[Any] = set()
    total = 0
    for t in tensors:
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class _preserved_buffers:
    """Restore every buffer's value on exit (training flags: :func:`torchslim.modes.training_mode`)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for buf, saved in self.buffers:
                if buf.shape == saved.shape and not torch.equal(buf, saved):
                    buf.copy_(saved)
        return False
