"""Latency measurement done properly: warm-up, repeated runs, median and spread, fixed threads."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, Iterator

import torch


@dataclasses.dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    threads: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count set to ``threads`` (None: unchanged)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def measure_latency(fn: Callable[[], object], *, warmup: int = 5, repeats: int = 20,
                    threads: int | None = None) -> LatencyStats:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls, under ``no_grad``.

    ``threads`` fixes torch's intra-op thread count for the measurement (restored after).
    """
    with fixed_threads(threads) as used, torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * (len(times) - 1) + 0.5))]  # noqa: E731
    return LatencyStats(statistics.median(times), pick(0.1), pick(0.9), len(times), used)
