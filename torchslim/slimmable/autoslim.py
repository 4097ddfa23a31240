"""AutoSlim (Yu & Huang, "AutoSlim: Towards One-Shot Architecture Search for Channel Numbers",
2019): greedy slimming of a trained slimmable network under a budget.

Each step tries every group one step narrower (``step`` of its channels, its least important
ones: after ``make_slimmable`` those are its last) and keeps the candidate that scores best
after BatchNorm calibration on a few batches (equal scores: the one saving the most of the
budgeted resource); the loop stops at the budget, the last step
handing back what it cut past it. Candidates are evaluated through the search framework
(:class:`torchslim.search.Search`: history, resume, ``max_evals``, parallel executors) on the
slimmable model's shared weights, so the result is an ordinary per-group ``PruneConfig`` and
``result.apply_`` (or :func:`autoslim`) gives the physically slimmed model.

Where this departs from the paper: the paper slims a network trained at 1.5x width and
retrains the found architecture from scratch; here the search runs on the network as trained
(any model the engine covers) and the found widths keep the trained weights (fine-tune them).
With ``uniform_baseline=True`` (the default) the search also scores the uniform width at the
budget, one more evaluation, and returns it where it scores higher than the greedy path's end:
the greedy path picks each step on a few batches, and on a network trained at uniform widths
only its non-uniform end can score below the uniform width it started from.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.graph import DependencyGraph, Group
from torchslim.pruning import PruneConfig, PruneResult, keep_count
from torchslim.search import Record, Search, SearchResult
from torchslim.search.base import Evaluator
from torchslim.slimmable.slimmable import Slimmable, copy_without_hooks


def positional_importance(graph: DependencyGraph, group: Group) -> np.ndarray:
    """Scores that rank a sorted slimmable model's atoms by place: within each class of
    interchangeable atoms the first scores highest, so a group keeps its first atoms."""
    place = {int(atom): i for i, atom in enumerate(group.atoms)}
    scores = np.zeros(len(group), dtype=np.float64)
    for members in graph.interchangeable(group):
        for rank, atom in enumerate(members.tolist()):
            scores[place[atom]] = 1.0 - rank / len(members)
    return scores


@dataclasses.dataclass
class SlimStep:
    """One greedy step: the resource before and after, the group narrowed and the kept score."""

    index: int
    before: float
    after: float
    group: int
    score: float


class AutoSlimSearch(Search):
    """Greedy slimming (see the module docstring) of ``slim`` under ``target_macs`` /
    ``target_params`` / ``target_latency``; ``data`` are the calibration batches (required:
    widths share BatchNorm statistics, so each candidate is recalibrated before scoring);
    ``step`` the share of a group's channels one step removes; no group goes below the smallest
    width the model was made slimmable for; ``uniform_baseline``: also score the uniform width at
    the budget and return it where it scores higher (``kept_uniform`` says so after ``run``)."""

    method = "autoslim"
    uniform_note = "uniform width at the budget"

    def __init__(self, slim: Slimmable, example_inputs: ExampleInputs, evaluate: Evaluator, *, data: Any,
                 step: float = 0.1, uniform_baseline: bool = True, **kwargs: Any):
        if slim.config.switchable_bn:
            raise ValueError("AutoSlim calibrates the shared BatchNorm of each candidate; a model with switchable "
                             "BatchNorm has statistics for its configured widths only: make it slimmable without "
                             "switchable_bn (US-Nets style) to search its widths")
        if data is None:
            raise ValueError("AutoSlim needs data= (a few batches to calibrate BatchNorm for each candidate)")
        if not 0 < step < 1:
            raise ValueError(f"step must be a share of a group's channels in (0, 1), got {step}")
        config = PruneConfig(exclude=list(slim.config.exclude), filter_fn=slim.config.filter_fn, exact_only=False,
                             round_to=slim.config.round_to)
        super().__init__(copy_without_hooks(slim), example_inputs, evaluate, data=data, recalibrate_bn=True,
                         criterion=positional_importance, config=config, **kwargs)
        if self.space.quantity is None:
            raise ValueError("AutoSlim needs a budget: target_macs, target_params or target_latency")
        self.slim_groups = sorted(g.index for g in slim.groups if g.index in self.space.sizes)
        self.step, self.smallest = step, slim.config.smallest  # never narrower than the model was trained at
        self.uniform_baseline = uniform_baseline
        self.steps: list[SlimStep] = []
        self._chosen: Record | None = None

    def options(self) -> dict[str, Any]:
        return {"step": self.step, "groups": self.slim_groups, "uniform_baseline": self.uniform_baseline}

    def resource(self, ratios: dict[int, float]) -> float:
        assert self.space.quantity is not None
        return self.space.measure(ratios).get(self.space.quantity)

    def explore(self) -> None:
        self.steps = []
        budget = self.space.budget()
        current: dict[int, float] = {}
        while (before := self.resource(current)) > budget:
            proposing = [(g, p) for g in self.slim_groups if (p := self.narrower(current, g)) is not None]
            if not proposing:
                raise ValueError(f"AutoSlim: every group is at its narrowest and the {self.space.quantity} is still "
                                 f"{before:.6g} > {budget:.6g}")
            proposing = [(g, self.space.give_back(p, budget) if self.resource(p) <= budget else p) for g, p in proposing]
            records = self.evaluate_batch([p for _, p in proposing], meet_budget=False,
                                          notes=[f"step {len(self.steps)}: group {g} narrower" for g, _ in proposing])
            best_group, best = self.best_candidate([g for g, _ in proposing], records)
            current = dict(best.ratios)
            self._chosen = best
            self.steps.append(SlimStep(len(self.steps), before, self.resource(current), best_group, best.score))
        if self.uniform_baseline and self.steps:
            self.compare_uniform(budget)

    def compare_uniform(self, budget: float) -> None:
        """Score the uniform width at the budget and keep it where it beats the greedy path's end
        (equal scores keep the greedy result)."""
        ratios = self.uniform_ratios(budget)
        if ratios is None:
            return
        record = self.evaluate_batch([ratios], meet_budget=False, notes=[self.uniform_note])[0]
        if self._chosen is None or record.score > self._chosen.score:
            self._chosen = record

    @property
    def kept_uniform(self) -> bool:
        """Whether the search returns the uniform width (it scored above the greedy path's end)."""
        return self._chosen is not None and self._chosen.note == self.uniform_note

    def uniform_ratios(self, budget: float) -> dict[int, float] | None:
        """Every slimmable group at the widest common width whose resource meets ``budget``
        (never below the smallest trained width); None if even that width exceeds it."""
        def at(ratio: float) -> dict[int, float]:
            return self.space.exact_ratios({g: ratio for g in self.slim_groups})

        low, high = 0.0, 1.0 - self.smallest
        if self.resource(at(high)) > budget:
            return None
        for _ in range(30):
            middle = (low + high) / 2
            low, high = (low, middle) if self.resource(at(middle)) <= budget else (middle, high)
        return at(high)

    def best_candidate(self, groups: list[int], records: list[Record]) -> tuple[int, Record]:
        """The best-scoring candidate; among equal scores (accuracy on a small validation set
        ties often) the one that saves the most of the budgeted resource, then the lowest group."""
        left = [self.resource(dict(record.ratios)) for record in records]
        best = max(range(len(records)), key=lambda i: (records[i].score, -left[i], -groups[i]))
        return groups[best], records[best]

    def narrower(self, current: dict[int, float], group: int) -> dict[int, float] | None:
        """``current`` with ``group`` one step narrower (at least one representable count), or
        None at its narrowest."""
        n = self.space.sizes[group]
        kept_now = self.space.keep_counts(current)[group]
        floor = keep_count(n, 1.0 - self.smallest, self.space.base, self.space.selector.round_to, 1)
        target = min(kept_now - 1, kept_now - int(round(self.step * n)))
        for kept in range(target, floor - 1, -1):
            try:
                return {**current, group: self.space.ratio_keeping(group, kept)}
            except ValueError:  # not a count this rounding keeps
                continue
        return None

    def choose(self) -> Record | None:
        return self._chosen if self._chosen is not None and self._chosen.meets_budget else None


def autoslim(slim: Slimmable, example_inputs: ExampleInputs, evaluate: Evaluator, *, data: Any,
             **kwargs: Any) -> tuple[SearchResult, nn.Module, PruneResult]:
    """Run :class:`AutoSlimSearch` and return its result, the slimmed model (a physically
    pruned copy of ``slim.model``; ``slim`` is not changed) and the pruning that made it."""
    result = AutoSlimSearch(slim, example_inputs, evaluate, data=data, **kwargs).run()
    model = copy_without_hooks(slim)
    pruned = result.apply_(model, example_inputs)
    return result, model, pruned
