"""Simulated annealing over per-group ratios, after NNI's SimulatedAnnealingPruner (Kirkpatrick
et al., 1983; used for pruning in AutoCompress, Liu et al., AAAI 2020).

As NNI's pruner: a start temperature (100) cooled by a rate (0.9) per step down to a stop
temperature (20), one candidate per step; a candidate perturbs the current ratios by
uniform noise of ``perturbation_magnitude x T / T_start`` per group; with ``size_order`` the
ratios are then sorted and handed out by group size (the largest group gets the largest ratio,
NNI's "sparsities assigned by layer size order"); and the candidate is scaled to meet the
budget exactly (here along its own proportions, :meth:`SearchSpace.meet_budget`). A better
candidate is always accepted, a worse one with probability ``exp(-dE / T)``.

Where this departs from NNI: NNI takes ``dE`` as the raw difference of scores, so with an
accuracy in [0, 1] and T >= 20 nearly every worse candidate is accepted; here ``dE`` is the
difference in percent of the spread of the scores seen so far (max - min), so the acceptance
does not depend on the evaluator's scale and falls as the search cools.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from torchslim.search.base import Search
from torchslim.search.history import Record


class AnnealingSearch(Search):
    """Simulated annealing (see the module docstring). Needs a budget; one evaluation per
    temperature step (16 with the defaults) plus the initial candidate."""

    method = "annealing"

    def __init__(self, *args: Any, start_temperature: float = 100.0, stop_temperature: float = 20.0,
                 cool_down_rate: float = 0.9, perturbation_magnitude: float = 0.35, size_order: bool = True,
                 **kwargs: Any):
        self.check_options(start_temperature, stop_temperature, cool_down_rate, perturbation_magnitude, size_order)
        super().__init__(*args, **kwargs)
        if self.space.quantity is None:
            raise ValueError("simulated annealing needs a budget: target_macs, target_params or target_latency")
        self.start_temperature, self.stop_temperature = start_temperature, stop_temperature
        self.cool_down_rate, self.perturbation_magnitude, self.size_order = (cool_down_rate, perturbation_magnitude,
                                                                              size_order)
        self.groups = sorted(self.space.sizes)
        self.size_rank = self._size_rank()

    @staticmethod
    def check_options(start_temperature: float = 100.0, stop_temperature: float = 20.0, cool_down_rate: float = 0.9,
                      perturbation_magnitude: float = 0.35, size_order: bool = True) -> None:
        """Raise ``ValueError`` on a schedule that cannot run (before any tracing or evaluation)."""
        if not start_temperature > stop_temperature > 0:
            raise ValueError(f"need start_temperature > stop_temperature > 0, got {start_temperature}, {stop_temperature}")
        if not 0 < cool_down_rate < 1:
            raise ValueError(f"cool_down_rate must be in (0, 1), got {cool_down_rate}")
        if not 0 < perturbation_magnitude <= 1:
            raise ValueError(f"perturbation_magnitude must be in (0, 1], got {perturbation_magnitude}")
        if not isinstance(size_order, bool):
            raise TypeError(f"size_order must be a bool, got {type(size_order).__name__}")

    def options(self) -> dict[str, Any]:
        return {"start_temperature": self.start_temperature, "stop_temperature": self.stop_temperature,
                "cool_down_rate": self.cool_down_rate, "perturbation_magnitude": self.perturbation_magnitude,
                "size_order": self.size_order}

    def _size_rank(self) -> list[int]:
        """Group ids, smallest first by the parameters their removal frees (half of each group)."""
        original = self.space.original.params
        freed = {g: original - self.space.measure({g: 0.5}).params for g in self.groups}
        return sorted(self.groups, key=lambda g: (freed[g], g))

    def _arrange(self, values: np.ndarray) -> dict[int, float]:
        """Ratios in [0, the group's cap] (``values`` in group id order, or with ``size_order``
        sorted and handed out smallest group first)."""
        if self.size_order:
            return self.space.clip(dict(zip(self.size_rank, np.sort(values))))
        return self.space.clip(dict(zip(self.groups, values)))

    def explore(self) -> None:
        current = self.evaluate_ratios(self._arrange(self.rng.uniform(0.0, 1.0, len(self.groups))), note="initial")
        scores = [current.score]
        temperature = self.start_temperature
        while temperature > self.stop_temperature:
            magnitude = self.perturbation_magnitude * temperature / self.start_temperature
            order = self.size_rank if self.size_order else self.groups  # as _arrange hands the ratios out
            base = np.array([current.ratios.get(g, 0.0) for g in order])
            proposal = base + self.rng.uniform(-magnitude, magnitude, len(order))
            candidate = self.evaluate_ratios(self._arrange(proposal), note=f"T={temperature:.4g}")
            scores.append(candidate.score)
            if self._accept(current, candidate, scores, temperature):
                current = candidate
            temperature *= self.cool_down_rate

    def _accept(self, current: Record, candidate: Record, scores: list[float], temperature: float) -> bool:
        if candidate.score >= current.score:
            return True
        finite = [s for s in scores if math.isfinite(s)]
        spread = (max(finite) - min(finite)) if len(finite) > 1 else 0.0
        if not math.isfinite(candidate.score) or spread <= 0:
            return False
        delta = 100.0 * (current.score - candidate.score) / spread
        return bool(self.rng.uniform() < math.exp(-delta / temperature))
