"""Whole-model latency on PyTorch eager or ONNX Runtime (CPU), warm-up, repeats, medians."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn

from torchslim._inputs import ExampleInputs, call_model, normalize_inputs
from torchslim._timing import LatencyStats, measure_latency, warn_if_rounds_disagree
from torchslim.modes import training_mode


RUNTIMES = ("torch", "onnxruntime")
T = TypeVar("T")
K = TypeVar("K")


def measure_model(model: nn.Module, example_inputs: ExampleInputs, *, runtime: str = "torch", threads: int | None = 1,
                  warmup: int = 5, repeats: int = 30) -> LatencyStats:
    """Median latency of ``model`` on ``runtime`` ("torch" or "onnxruntime")."""
    return measure_in_turn({"model": model}, example_inputs, runtime=runtime, threads=threads, rounds=1,
                           warmup=warmup, repeats=repeats)["model"]


def measure_in_turn(models: dict[str, nn.Module], example_inputs: ExampleInputs, *, runtime: str = "torch",
                    threads: int | None = 1, rounds: int = 3, warmup: int = 5,
                    repeats: int = 30) -> dict[str, LatencyStats]:
    """Latency of each model on ``runtime``, the models timed in turn for ``rounds`` rounds and
    each one's least-disturbed round kept (:func:`best_of_rounds`).

    Timing the models in turn is what keeps a before/after ratio honest on a busy machine: a
    burst of other work lands on one round of every model instead of on all of one model's
    runs. Each result's ``round_medians_ms`` lists its rounds; rounds more than
    ``ROUNDS_DISAGREE_FACTOR`` apart raise a :class:`~torchslim._timing.LatencyNoiseWarning`.
    """
    with contextlib.ExitStack() as modes:
        for model in models.values():  # timed in eval mode; every training flag comes back afterwards
            modes.enter_context(training_mode(model, False))
        runners = {label: make_runner(model, example_inputs, runtime, threads) for label, model in models.items()}
        timers = {label: (lambda run=run: measure_latency(run, warmup=warmup, repeats=repeats, threads=threads))
                  for label, run in runners.items()}
        history: dict[str, list[LatencyStats]] = {}
        stats = best_of_rounds(timers, rounds, key=lambda s: s.median_ms, history=history)
    for label, entry in stats.items():
        entry.round_medians_ms = [s.median_ms for s in history[label]]
        if runtime == "onnxruntime":
            entry.threads = threads or 0  # the session's own thread count, not torch's
        warn_if_rounds_disagree(f"'{label}'", entry)
    return stats


def make_runner(model: nn.Module, example_inputs: ExampleInputs, runtime: str = "torch",
                threads: int | None = 1) -> Callable[[], object]:
    """A call that runs ``model`` on ``example_inputs`` in ``runtime``. For ONNX Runtime the
    model is exported now (in eval mode), into a session with ``threads`` intra-op threads, so
    later changes to ``model`` do not reach it; the torch call runs the live model in whatever
    mode it is in when called (time it in eval mode, e.g. under
    :func:`torchslim.modes.training_mode`, and under ``fixed_threads``, as
    :func:`measure_latency` does). The model's training flags are left as they were."""
    if runtime == "torch":
        return lambda: call_model(model, example_inputs)
    if runtime == "onnxruntime":
        return _onnxruntime_runner(model, example_inputs, threads)
    raise ValueError(f"runtime must be 'torch' or 'onnxruntime', got {runtime!r}")


def _onnxruntime_runner(model, example_inputs, threads) -> Callable[[], object]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("runtime 'onnxruntime' needs onnxruntime: pip install 'torchslim[onnx]'") from None
    args, kwargs = normalize_inputs(example_inputs)
    if kwargs:
        raise ValueError("ONNX latency takes positional tensor inputs only")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        from torchslim.graph.macs import fastpath_disabled

        with torch.no_grad(), fastpath_disabled(), training_mode(model, False):  # no fused MHA kernel in ONNX
            torch.onnx.export(model, tuple(args), str(path), dynamo=False, opset_version=17)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tensors = [a for a in args if isinstance(a, torch.Tensor)]  # Python flags are baked into the graph
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), tensors)}
    return lambda: session.run(None, feeds)


def best_of_rounds(timers: Mapping[K, Callable[[], T]], rounds: int = 3,
                   key: Callable[[Any], float] = float, history: dict[K, list[T]] | None = None) -> dict[K, T]:
    """Call every timer in turn for ``rounds`` rounds and keep, per name, the result with the
    lowest ``key`` (each timer returns one median: a float, or LatencyStats with
    ``key=lambda s: s.median_ms``), so that load from other processes and a cold first
    measurement hit all of them alike and the least-disturbed round counts. ``history``, when
    given, receives every round's result per name, in order."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    best: dict[K, T] = {}
    for _ in range(rounds):
        for name, timer in timers.items():
            value = timer()
            if history is not None:
                history.setdefault(name, []).append(value)
            if name not in best or key(value) < key(best[name]):
                best[name] = value
    return best
