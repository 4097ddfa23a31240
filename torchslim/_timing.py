"""Latency measured properly: warm-up, repeated runs, median and spread, a stated thread count.

* :func:`measure_latency` times a whole call (``warmup`` untimed runs, then ``repeats``
  timed ones; median, p10 and p90).
* :func:`module_latency` times every submodule of a model inside the same kind of repeated
  runs, with forward pre/post hooks: per run, the time inside each module's forward (all its
  calls summed) and the part of it not spent in child-module calls; the medians over runs.
* :func:`warn_if_rounds_disagree` flags measurements repeated in rounds whose round medians
  disagree: the machine was busy while timing (:class:`LatencyNoiseWarning`).

Both run under ``torch.no_grad`` with torch's intra-op thread count fixed for the duration
(``threads=None`` keeps the current count) and restored afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import statistics
import time
import warnings
from collections import defaultdict
from typing import Callable, Iterator

import torch
from torch import nn


#: Round medians further apart than this factor (slowest / fastest) mean the machine was busy.
ROUNDS_DISAGREE_FACTOR = 1.5


class LatencyNoiseWarning(UserWarning):
    """Repeated rounds timing the same model disagree: other work on the machine disturbed them."""


@dataclasses.dataclass
class LatencyStats:
    """Milliseconds per call: the median and the 10th / 90th percentiles of ``runs`` timed calls.

    Measured in rounds (:func:`torchslim.latency.measure_in_turn`, :func:`torchslim.analyze`),
    the figures are those of the least-disturbed round and ``round_medians_ms`` holds every
    round's median, in order.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    threads: int
    round_medians_ms: list[float] = dataclasses.field(default_factory=list)

    @property
    def spread_ms(self) -> float:
        """p90 - p10: how noisy the measurement was."""
        return self.p90_ms - self.p10_ms

    @property
    def rounds_factor(self) -> float:
        """Slowest round median / fastest (1.0 with fewer than two rounds)."""
        medians = [m for m in self.round_medians_ms if m > 0]
        return max(medians) / min(medians) if len(medians) > 1 else 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ModuleTiming:
    """Per-run medians for one module: time inside its forward, and the part outside child modules."""

    median_ms: float
    self_median_ms: float
    calls: int  # forward calls per run


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count set to ``threads`` (None: unchanged).

    Yields the thread count in effect; the previous count is restored on exit.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


MAX_REPEATS = 1000


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory in the process instead of returning it to the OS.

    By default every activation above 128 KiB is mmap-ed and unmapped again, so each forward
    page-faults its activations back in; on virtual machines a fault can cost enough to double
    a MobileNetV2 forward and to drift with the host's load. jemalloc/tcmalloc deployments keep
    the memory, and so do timings after this call. Process-wide and irreversible; returns
    False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def warn_if_rounds_disagree(label: str, stats: LatencyStats, factor: float = ROUNDS_DISAGREE_FACTOR,
                            stacklevel: int = 3) -> str | None:
    """Warn (:class:`LatencyNoiseWarning`) when ``stats``' round medians differ by more than
    ``factor``; returns the message (None when they agree)."""
    if stats.rounds_factor <= factor:
        return None
    medians = ", ".join(f"{m:.2f}" for m in stats.round_medians_ms)
    message = (f"latency of {label} varied {stats.rounds_factor:.1f}x across {len(stats.round_medians_ms)} rounds "
               f"(medians {medians} ms): other work on the machine disturbed the timing; the least-disturbed "
               f"round is reported")
    cores = os.cpu_count() or 1
    if stats.threads > 1 and stats.threads >= cores:
        message += (f". Timing with {stats.threads} threads on {cores} cores makes every parallel op wait for a "
                    "thread another process holds: time with 1 thread on a shared machine")
    warnings.warn(message, LatencyNoiseWarning, stacklevel=stacklevel)
    return message


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


def measure_latency(fn: Callable[[], object], warmup: int = 5, repeats: int = 20,
                    threads: int | None = None, min_seconds: float = 0.0) -> LatencyStats:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones, under ``no_grad``.

    ``min_seconds``: time more calls where ``repeats`` of them would take less than this
    (judged from the warm-up), so that a millisecond model gets as steady a median as a slow one.
    """
    _check_counts(warmup, repeats)
    with fixed_threads(threads) as used, torch.no_grad():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        if min_seconds > 0 and warmup:
            per_call = (time.perf_counter() - start) / warmup
            repeats = max(repeats, min(int(min_seconds / max(per_call, 1e-6)), MAX_REPEATS))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000.0)
    return LatencyStats(statistics.median(times), percentile(times, 0.1), percentile(times, 0.9), len(times), used)


def module_latency(model: nn.Module, fn: Callable[[], object], warmup: int = 1, repeats: int = 10,
                   threads: int | None = None) -> dict[str, ModuleTiming]:
    """Median time per run inside each module of ``model`` (qualified names, root ``""``) while ``fn()`` runs.

    Hooks add a little overhead to every module call, so these times are for *shares*; take
    the whole model's latency from :func:`measure_latency`. Modules that never run are absent.
    """
    _check_counts(warmup, repeats)
    names = {id(m): name for name, m in model.named_modules()}
    stack: list[list] = []  # [module id, start time, time in child calls]
    run: dict[str, list[float]] = {}

    def pre_hook(module, args):
        stack.append([id(module), 0.0, 0.0])
        stack[-1][1] = time.perf_counter()

    def post_hook(module, args, output):
        now = time.perf_counter()
        while stack:
            key, start, children = stack.pop()
            elapsed = now - start
            if stack:
                stack[-1][2] += elapsed
            entry = run.setdefault(names[key], [0.0, 0.0, 0])
            entry[0] += elapsed
            entry[1] += elapsed - children
            if key == id(module):
                entry[2] += 1
                break

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    samples: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    try:
        with fixed_threads(threads), torch.no_grad():
            for i in range(warmup + repeats):
                run.clear()
                stack.clear()
                fn()
                if i >= warmup:
                    for name, (total, own, calls) in run.items():
                        samples[name].append((total * 1000.0, own * 1000.0, int(calls)))
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: ModuleTiming(statistics.median(s[0] for s in values), statistics.median(s[1] for s in values),
                           max(s[2] for s in values))
        for name, values in samples.items()
    }
