"""NetAdapt (Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
Applications", ECCV 2018): cut the resource a scheduled amount per iteration, keeping the best
of one proposal per group.

As in the paper (Algorithm 1): iteration k lowers the resource bound to
``R_k = R_{k-1} - dR_k``, with the reduction schedule ``dR_k = initial_cut x R_0 x decay^k``
(the paper starts at a few percent of the original and decays it; here 1.5% and 0.98 by
default), never below the budget; every group proposes the *smallest* removal of its own
channels (lowest-ranked first, the paper's magnitude choice is the ``criterion``; the
other groups as they stand) that brings the resource to ``R_k`` or below, so each iteration
cuts at least its scheduled amount; each proposal gets the short-term fine-tune
(``finetune(model, finetune_budget)``) and the evaluation; the best is kept; the loop stops
once the budget is met. Under a latency budget the resource is the latency the per-layer
table predicts (the paper's empirical latency model, built per platform).

Where this departs from the paper: the paper carries each iteration's short-term fine-tuned
weights into the next; here every proposal is the original weights with the accumulated
removal, fine-tuned on a copy, so the result stays an ordinary per-group ``PruneConfig``
(apply it, then run the long-term fine-tune as the paper does at the end). When no single
group can cut an iteration's scheduled amount any more (each group near its limit, or a latency
table flat in that range), the iteration's cut is halved, up to ``MAX_HALVINGS`` times, instead
of stopping short of the budget. In the last iteration (the bound is the budget) each proposal
hands back, one step at a time, the channels it cut past the budget (one channel of a narrow
group can be a large share of what is left), so the result lands just under the budget. Under a latency budget the result is then timed against the
unpruned model; where it measures over the target (the table times layers alone), the table's
goal is lowered by the measured excess and the iterations go on (``measure_latency=False``
keeps the table's word).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from torchslim.pruning.selector import keep_count
from torchslim.search.base import Search
from torchslim.search.history import Record
from torchslim.search.latency_loop import removal_timer
from torchslim.latency import best_of_rounds

MAX_HALVINGS = 6
# under a latency budget the result is timed (the table predicts layers timed alone); measured
# more than LATENCY_TOLERANCE over the target, the table's goal is lowered by the measured excess
# and the iterations continue, at most CALIBRATION_ROUNDS times
LATENCY_TOLERANCE = 0.04
CALIBRATION_ROUNDS = 3


@dataclasses.dataclass
class Iteration:
    """One NetAdapt iteration: the resource before, its cut (the schedule's, halved ``halved``
    times where no single group could make it), the bound ``before - scheduled``, what the kept
    proposal left, which group it cut and its score."""

    index: int
    before: float
    scheduled: float
    bound: float
    after: float
    group: int
    score: float
    halved: int = 0  # times the schedule's cut was halved because no single group could make it


class NetAdaptSearch(Search):
    """NetAdapt (see the module docstring). Needs a budget; ``max_iterations`` bounds the loop
    (besides ``max_evals`` / ``time_limit``); ``iterations`` lists what each one did."""

    method = "netadapt"

    def __init__(self, *args: Any, initial_cut: float = 0.015, decay: float = 0.98, max_iterations: int = 200,
                 measure_latency: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not 0 < initial_cut < 1:
            raise ValueError(f"initial_cut must be a fraction of the original resource in (0, 1), got {initial_cut}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if self.space.quantity is None:
            raise ValueError("NetAdapt needs a budget: target_macs, target_params or target_latency")
        self.initial_cut, self.decay, self.max_iterations = initial_cut, decay, max_iterations
        self.measure_latency = measure_latency
        self.iterations: list[Iteration] = []
        self.calibration: list[dict[str, Any]] = []  # under a latency budget: each measurement of the result
        self._chosen: Record | None = None

    def options(self) -> dict[str, Any]:
        return {"initial_cut": self.initial_cut, "decay": self.decay, "max_iterations": self.max_iterations,
                "measure_latency": self.measure_latency}

    def resource(self, ratios: dict[int, float]) -> float:
        assert self.space.quantity is not None
        return self.space.measure(ratios).get(self.space.quantity)

    def schedule(self, index: int) -> float:
        """The resource iteration ``index`` (from 0) must cut, in the budget's unit."""
        assert self.space.quantity is not None
        return self.initial_cut * self.space.original.get(self.space.quantity) * self.decay ** index

    def explore(self) -> None:
        self.iterations, self.calibration = [], []
        budget = self.space.budget()
        current = self._iterate({}, budget)
        if self.space.quantity != "latency" or not self.measure_latency:
            return
        target = self.space.budget() / self.space.original.get("latency")  # the share of the latency asked for
        assert self.history is not None
        for round_ in range(CALIBRATION_ROUNDS):
            predicted = self.resource(current)
            measured = self.history.measurement(f"measured latency share, round {round_}",
                                                functools.partial(self.measured_share, current))
            self.calibration.append({"predicted_ms": predicted, "measured_share": measured, "goal_ms": budget})
            if measured is None or measured <= target * (1 + LATENCY_TOLERANCE):
                return
            budget = predicted * target / measured  # the table's milliseconds that measure as the target
            current = self._iterate(current, budget)

    def measured_share(self, ratios: dict[int, float]) -> float | None:
        """The latency of the model pruned at ``ratios`` over the unpruned one's, timed in turn on
        the budget's runtime (best of rounds); None if the pruned model does not run."""
        removal = self.space.removal(ratios)
        timers = {"unpruned": removal_timer(self.space.graph, removal[:0], self.example_inputs, self.config),
                  "pruned": removal_timer(self.space.graph, removal, self.example_inputs, self.config)}
        if any(t is None for t in timers.values()):
            return None
        times = best_of_rounds(timers, rounds=3)
        return times["pruned"] / times["unpruned"] if times["unpruned"] > 0 and math.isfinite(times["pruned"]) else None

    def _iterate(self, current: dict[int, float], budget: float) -> dict[int, float]:
        """NetAdapt's iterations from ``current`` until the resource is at most ``budget``."""
        for index in range(len(self.iterations), self.max_iterations):
            before = self.resource(current)
            if before <= budget:
                break
            scheduled = self.schedule(index)
            proposing, halved = [], 0
            while True:
                bound = max(before - scheduled, budget)
                proposals = {group: self.smallest_removal(current, group, bound) for group in sorted(self.space.sizes)}
                proposing = [(group, p) for group, p in proposals.items() if p is not None]
                if bound <= budget:  # the last iteration: hand back what a coarse group cut past the budget
                    proposing = [(group, self.space.give_back(p, budget)) for group, p in proposing]
                if proposing or halved == MAX_HALVINGS:
                    break
                scheduled, halved = scheduled / 2, halved + 1  # no single group can cut that much any more
            best: Record | None = None
            best_group = -1
            records = self.evaluate_batch([p for _, p in proposing], meet_budget=False,
                                          notes=[f"iteration {index}: group {g} to {p.get(g, 0.0):g}" for g, p in proposing])
            for (group, _), record in zip(proposing, records):
                if best is None or record.score > best.score:
                    best, best_group = record, group
            if best is None:
                raise ValueError(f"NetAdapt iteration {index}: no single group can bring the {self.space.quantity} "
                                 f"from {before:.6g} to {bound:.6g}, even with the scheduled cut halved "
                                 f"{MAX_HALVINGS} times; the budget needs several groups cut at once")
            current = dict(best.ratios)
            self._chosen = best
            self.iterations.append(Iteration(index, before, scheduled, bound, self.resource(current), best_group,
                                             best.score, halved))
        return current

    def smallest_removal(self, current: dict[int, float], group: int, bound: float) -> dict[int, float] | None:
        """``current`` with ``group`` cut by the fewest atoms that bring the resource to ``bound``
        or below (binary search over its kept counts), or None if even its cap does not."""
        n = self.space.sizes[group]
        kept_now = self.space.keep_counts(current)[group]
        floor = keep_count(n, self.space.cap(group), self.space.base, self.space.selector.round_to,
                           self.space.graph.atom_width(self.space.groups[self._position(group)]))
        options = [k for k in range(kept_now - 1, floor - 1, -1) if self._representable(group, k)]
        if not options or self.resource(self._with(current, group, options[-1])) > bound:
            return None
        lo, hi = -1, len(options) - 1  # options[hi] meets the bound; options[lo] (or the current) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.resource(self._with(current, group, options[mid])) <= bound:
                hi = mid
            else:
                lo = mid
        return self._with(current, group, options[hi])

    def _with(self, current: dict[int, float], group: int, kept: int) -> dict[int, float]:
        return {**current, group: self.space.ratio_keeping(group, kept)}

    def _representable(self, group: int, kept: int) -> bool:
        try:
            self.space.ratio_keeping(group, kept)
        except ValueError:
            return False
        return True

    def _position(self, group: int) -> int:
        return next(i for i, g in enumerate(self.space.groups) if g.index == group)

    def choose(self) -> Record | None:
        return self._chosen if self._chosen is not None and self._chosen.meets_budget else None
