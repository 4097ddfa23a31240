"""The candidate space of a search: per-group prune ratios on one traced graph.

A candidate is ``{group id: ratio}`` (the share of the group's atoms removed, lowest-ranked
first under the config's criterion); groups left out keep everything. It is turned into atoms
by the same :class:`~torchslim.pruning.selector.Selector` ``prune_`` uses, with the ratios as
``PruneConfig.ratios`` keyed by group id, so the config a search returns removes exactly the
atoms the search evaluated. MACs, parameters and predicted latency are read off the graph
without running the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from torch import nn

from torchslim.graph import DependencyGraph, Group
from torchslim.graph.macs import estimate_macs
from torchslim.criteria import make_importance
from torchslim.pruning import PruneConfig
from torchslim.pruning.selector import (TARGET_SEARCH_MAX_RATIO, Selector, eligible_groups, estimate_params,
                                       group_labels, keep_count)

Ratios = Mapping[int, float]
# a candidate's ratios are scaled along a monotone path until the budget is met: bisection steps
BUDGET_STEPS = 40


@dataclasses.dataclass(frozen=True)
class Measures:
    """What a removal leaves: MACs, trainable parameters and (under a latency budget) the
    latency the per-layer table predicts, in ms."""

    macs: int
    params: int
    latency_ms: float | None = None

    def get(self, quantity: str) -> float:
        value = {"macs": self.macs, "params": self.params, "latency": self.latency_ms}[quantity]
        if value is None:
            raise ValueError(f"no {quantity} measure: the search was not given a latency budget")
        return float(value)


class SearchSpace:
    """Eligible groups of one traced graph and what each per-group ratio removes and leaves.

    ``config`` gives the scope (``op_names``, ``exclude``...), the ``criterion``, ``round_to``,
    ``min_channels`` and the budget (its one target); ``model`` is traced as given (the search
    hands it its working copy). ``reference``: the model ``model`` was pruned from (same
    parameter names), or None; caps (:meth:`cap`) then count from its widths."""

    def __init__(self, model: nn.Module, example_inputs: Any, config: PruneConfig, *, data: Any = None,
                 loss_fn: Any = None, reference: nn.Module | None = None):
        if config.round_to == "latency":
            raise ValueError("round_to='latency' cannot be searched: it picks each width by timing at prune time, so "
                             "the MACs a candidate leaves are unknown until then; give an integer (e.g. 8)")
        self.config = config
        # a candidate's ratios are per group: the ranking settings that compare groups (global,
        # latency-aware) have nothing left to decide, and must not reach the result's config
        self.base = dataclasses.replace(config, ratio=0.0, ratios=None, target_macs=None, target_params=None,
                                        target_latency=None, global_ranking=False, latency_aware=False)
        self.graph = DependencyGraph.build(model, example_inputs)
        importance = make_importance(config.criterion, config.seed)
        if hasattr(importance, "prepare"):
            importance.prepare(self.graph, data, loss_fn)
        self.groups: list[Group] = eligible_groups(self.graph, self.base, quiet=True)
        scores = {g.index: np.asarray(importance(self.graph, g), dtype=np.float64) for g in self.groups}
        self.selector = Selector(self.graph, self.groups, scores, self.base)
        self.groups = list(self.selector.groups)  # exact groups unless exact_only=False
        self.left_out_inexact = [] if config.exact_only is False else [
            g for g in eligible_groups(self.graph, dataclasses.replace(self.base, exact_only=False), quiet=True)
            if not g.exact]
        self.sizes = {g.index: len(g) for g in self.groups}
        self.has_reference = reference is not None
        self.caps = (reference_caps(self.graph, self.groups, reference) if reference is not None else
                     {g.index: TARGET_SEARCH_MAX_RATIO for g in self.groups})
        self.latency = None
        target = config.target
        if target is not None and target.quantity == "latency":
            from torchslim.latency import LatencyModel, LatencyTable

            self.latency = LatencyModel(self.graph, example_inputs,
                                        LatencyTable(config.latency_runtime, config.latency_threads))
        self._banned = np.zeros(self.graph.n_atoms, dtype=bool)
        self._cache: dict[tuple, Measures] = {}
        self.original = self.measure({})

    # candidates -----------------------------------------------------------------------
    def keep_counts(self, ratios: Ratios) -> dict[int, int]:
        """Atoms each group keeps at ``ratios`` (every eligible group; absent ones keep all)."""
        return {g.index: keep_count(len(g), float(ratios.get(g.index, 0.0)), self.base, self.selector.round_to,
                                    self.graph.atom_width(g)) for g in self.groups}

    def exact_ratios(self, ratios: Ratios) -> dict[int, float]:
        """``ratios`` rewritten as short readable ratios that keep exactly the same atom counts
        (groups losing nothing are left out): what ``PruneConfig.ratios`` gets."""
        keep = self.keep_counts(ratios)
        exact = {}
        for index, kept in keep.items():
            n = self.sizes[index]
            if kept < n:
                exact[index] = self.ratio_keeping(index, kept)
        return exact

    def ratio_keeping(self, index: int, kept: int) -> float:
        """The shortest ratio under which group ``index`` keeps ``kept`` atoms."""
        n = self.sizes[index]
        group = self._group(index)
        width = self.graph.atom_width(group)
        exact = (n - kept) / n
        for ratio in [round(exact, digits) for digits in (2, 3, 4, 6)] + [(n - kept + 0.5) / n]:
            if 0.0 <= ratio < 1.0 and keep_count(n, ratio, self.base, self.selector.round_to, width) == kept:
                return float(ratio)
        raise ValueError(f"group {index} cannot keep {kept} of {n} atoms under round_to={self.selector.round_to}")

    def removal(self, ratios: Ratios) -> np.ndarray:
        """The atoms ``prune_`` removes under ``config_for(ratios)`` (before any rollback)."""
        exact = self.exact_ratios(ratios)
        if not exact:
            return np.zeros(0, dtype=np.int64)
        selector = self.selector.relaxed(ratios=dict(exact))
        return selector.remove_at(0.0, self._banned)

    def config_for(self, ratios: Ratios) -> PruneConfig:
        """The ordinary config that prunes ``ratios``: per-group ratios by group id, no target."""
        by_id: dict[str | int, float] = {index: r for index, r in self.exact_ratios(ratios).items()}
        return dataclasses.replace(self.base, ratios=by_id or None)

    # measures -------------------------------------------------------------------------
    def measure(self, ratios: Ratios) -> Measures:
        """MACs, params (and predicted latency under a latency budget) left by ``ratios``."""
        key = tuple(sorted(self.keep_counts(ratios).items()))
        if key not in self._cache:
            removed = self.removal(ratios)
            latency = self.latency.predict(removed) if self.latency is not None else None
            self._cache[key] = Measures(estimate_macs(self.graph, removed), estimate_params(self.graph, removed),
                                        latency)
        return self._cache[key]

    @property
    def quantity(self) -> str | None:
        target = self.config.target
        return None if target is None else target.quantity

    def budget(self) -> float:
        """The budget in its own unit (MACs, parameters, ms): a fraction (<= 1) of the original, else absolute."""
        target = self.config.target
        if target is None:
            raise ValueError("the search has no budget: give target_macs, target_params or target_latency")
        return target.value * self.original.get(target.quantity) if target.value <= 1 else target.value

    def meets(self, found: Measures) -> bool:
        return self.quantity is None or found.get(self.quantity) <= self.budget()

    # meeting the budget -----------------------------------------------------------------
    def cap(self, index: int) -> float:
        """The most group ``index`` may lose: ``TARGET_SEARCH_MAX_RATIO`` (as ``prune_``'s
        targets), or with a reference what keeps the group at ``1 - TARGET_SEARCH_MAX_RATIO``
        of its reference width (0 where it is already that thin), so successive searches on a
        pruned model (AutoCompress's rounds) do not compound their caps."""
        return self.caps[index]

    def clip(self, ratios: Ratios) -> dict[int, float]:
        """``ratios`` with every group held to [0, its cap]."""
        return {index: min(max(float(r), 0.0), self.caps[index]) for index, r in ratios.items()}

    def most_removed(self) -> dict[int, float]:
        """Every group at its cap (:meth:`cap`)."""
        return dict(self.caps)

    def check_reachable(self) -> None:
        """Refuse a budget that no candidate can meet, naming the smallest reachable value."""
        target = self.config.target
        if target is None:
            return
        least = self.measure(self.most_removed()).get(target.quantity)
        if least > self.budget():
            original = self.original.get(target.quantity)
            raise ValueError(f"PruneConfig.{target.field}={target.value:g} cannot be met by any candidate: the "
                             f"smallest reachable {target.quantity} is {least:.6g} ({least / original:.1%} of the "
                             f"original {original:.6g}), with every eligible group "
                             f"({len(self.groups)}) at {self._cap_words()}{self._inexact_hint()}")

    def _cap_words(self) -> str:
        if not self.has_reference:
            return f"ratio {TARGET_SEARCH_MAX_RATIO}"
        return (f"its cap (at most {TARGET_SEARCH_MAX_RATIO:.0%} of its width in the reference model gone; "
                f"{sum(c == 0 for c in self.caps.values())} group(s) are already that thin)")

    def _inexact_hint(self) -> str:
        if not self.left_out_inexact:
            return ""
        return (f"; {len(self.left_out_inexact)} inexact group(s) were left out "
                f"({group_labels(self.graph, self.left_out_inexact)}): exact_only=False in the search's config lets "
                f"it prune them too (the pruned model then differs slightly from the zeroed original)")

    def scaled(self, ratios: Ratios, u: float) -> dict[int, float]:
        """A point on the monotone path from no removal (u=0) through ``ratios``'s shape, scaled
        until a group reaches its cap (u=1), to every group at its cap (u=2)."""
        caps = self.caps
        shape = self.clip({g.index: ratios.get(g.index, 0.0) for g in self.groups})
        if not any(r > 0 for r in shape.values()):  # no shape: every group alike
            shape = dict(caps)
        stretches = [caps[index] / r for index, r in shape.items() if r > 0]
        if not stretches:  # every group is at its floor already
            return {index: 0.0 for index in shape}
        stretch = min(stretches)
        if u <= 1.0:
            return {index: min(caps[index], u * stretch * r) for index, r in shape.items()}
        saturated = {index: min(caps[index], stretch * r) for index, r in shape.items()}
        return {index: s + (u - 1.0) * (caps[index] - s) for index, s in saturated.items()}

    def meet_budget(self, ratios: Ratios) -> dict[int, float]:
        """``ratios`` scaled (see :meth:`scaled`) to the least removal meeting the budget: its
        proportions kept where they can be, the budget met to within one step of a group."""
        if self.quantity is None:
            return dict(ratios)
        lo, hi = 0.0, 2.0
        if self.meets(self.measure(self.scaled(ratios, lo))):
            return {}
        for _ in range(BUDGET_STEPS):
            mid = (lo + hi) / 2
            if self.meets(self.measure(self.scaled(ratios, mid))):
                hi = mid
            else:
                lo = mid
        return self.give_back({index: r for index, r in self.scaled(ratios, hi).items() if r > 0})

    def give_back(self, ratios: Ratios, limit: float | None = None) -> dict[int, float]:
        """``ratios`` (meeting the budget) with channels handed back one step at a time, a group
        per turn (the most cut first), while the budget (or ``limit``, in its unit, where a
        search aims below it) stays met: on small or tightly cut models one channel of a group
        is a large share of what is left, and the scaled path alone can land several percent
        under the budget."""
        bound = self.budget() if limit is None and self.quantity is not None else limit
        current = self.exact_ratios(ratios)
        keep = self.keep_counts(current)
        changed = True
        while changed:
            changed = False
            for index in sorted(current, key=lambda i: -current[i]):
                if index not in current:
                    continue
                trial = self._one_step_back(current, index, keep[index])
                if trial is not None and self._within(self.measure(trial), bound):
                    current, keep, changed = trial, self.keep_counts(trial), True
        return current

    def _within(self, found: Measures, bound: float | None) -> bool:
        return self.quantity is None or bound is None or found.get(self.quantity) <= bound

    def _one_step_back(self, ratios: dict[int, float], index: int, kept: int) -> dict[int, float] | None:
        """``ratios`` with group ``index`` keeping the next representable count above ``kept``."""
        for more in range(kept + 1, self.sizes[index] + 1):
            if more == self.sizes[index]:
                return {i: r for i, r in ratios.items() if i != index}
            try:
                return {**ratios, index: self.ratio_keeping(index, more)}
            except ValueError:  # not a count this rounding can keep
                continue
        return None

    def _group(self, index: int) -> Group:
        return next(g for g in self.groups if g.index == index)

    def describe(self) -> dict[str, Any]:
        """The space's identity, written at the head of a history: a resumed search checks it."""
        identity: dict[str, Any] = {"groups": {str(k): v for k, v in self.sizes.items()}, "macs": self.original.macs,
                                    "params": self.original.params}
        if self.has_reference:
            identity["caps"] = {str(k): round(v, 6) for k, v in self.caps.items()}
        return identity


def reference_caps(graph: DependencyGraph, groups: list[Group], reference: nn.Module) -> dict[int, float]:
    """Per group, the share it may lose so that it keeps ``1 - TARGET_SEARCH_MAX_RATIO`` of its
    width in ``reference``: the width is read off the group's producer slots (dim 0: conv
    filters, BatchNorm, Linear rows), the shrink being the largest reference/current ratio
    among them (a group found nowhere in ``reference`` keeps the plain cap)."""
    shapes = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    current = graph.parameters()
    caps = {}
    for group in groups:
        slots = [(n, d) for n, d in group.params if n in shapes and n in current and d < len(shapes[n])]
        producers = [(n, d) for n, d in slots if d == 0] or slots
        shrink = max((shapes[n][d] / current[n].shape[d] for n, d in producers if current[n].shape[d]), default=1.0)
        floor = (1.0 - TARGET_SEARCH_MAX_RATIO) * max(shrink, 1.0)
        caps[group.index] = min(TARGET_SEARCH_MAX_RATIO, max(0.0, 1.0 - floor))
    return caps
