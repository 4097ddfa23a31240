"""Which atoms to remove: eligible groups, per-group or global ranking, budgets and targets.

Per group (default), each group loses its ``ratio`` (or its module's ratio from
``PruneConfig.ratios``) of lowest-scored atoms. With ``global_ranking`` scores are divided by
their group's mean so groups compare (unless the criterion's scores already share one unit,
``comparable_across_groups``: Fisher's estimated loss increases), and the lowest atoms overall go, at most
``max_sparsity_per_layer`` (or its module's ratio) of any group. For ``target_macs`` / ``target_params`` the ratio is
searched by bisection on estimates from the graph; with global ranking the ranking is by
importance per MAC (or parameter) saved, so the budget is spent where importance is cheapest.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import math
import warnings
from typing import Any

import numpy as np

from torchslim.graph import DependencyGraph, Group
from torchslim.graph import module_aliases
from torchslim.graph.macs import estimate_macs
from torchslim.pruning.config import PruneConfig
from torchslim.pruning.plan import pruning_history

LOG = logging.getLogger(__name__)

TARGET_SEARCH_MAX_RATIO = 0.95
SEARCH_STEPS = 14


class PruningError(RuntimeError):
    """Pruning could not be applied; the model is unchanged."""


def eligible_groups(graph: DependencyGraph, config: PruneConfig, *, quiet: bool = False) -> list[Group]:
    """Groups the config allows to prune (op_names, exclude, filter_fn, protect_inputs, exact_only).

    ``exact_only=None`` (the default) prefers exact groups: without a target only exact groups
    are eligible (an ``InexactGroupsWarning`` says how many inexact ones were left, unless
    ``quiet``); with a target all are, and the ``Selector`` adds inexact ones only if the target
    needs them."""
    names = module_aliases(graph.model)  # a pattern may name a shared module by any of its names
    check_ratio_patterns(graph, names, config)
    chosen = atoms_of_matching(graph, names, config.op_names, "op_names") if config.op_names is not None else None
    blocked = []
    if config.exclude:
        blocked.append(atoms_of_matching(graph, names, config.exclude, "exclude"))
    if config.protect_inputs:
        blocked.append(atoms_of_matching(graph, names, config.protect_inputs, "protect_inputs", inputs=True))
    if config.filter_fn is not None:
        blocked += [graph.module_output_atoms(n) for n, m in graph.model.named_modules() if not config.filter_fn(n, m)]
    excluded = np.concatenate(blocked) if blocked else None
    if chosen is not None and excluded is not None and np.isin(chosen, excluded).all() and chosen.size:
        raise ValueError("PruneConfig.op_names and PruneConfig.exclude conflict: every selected module is also excluded")
    if chosen is not None and not (~graph.atom_pinned[chosen]).any():
        raise PruningError(blocked_message(graph, chosen, config.op_names))
    groups = []
    for group in graph.groups:
        if chosen is not None and not np.isin(group.atoms, chosen).any():
            continue
        if excluded is not None and np.isin(group.atoms, excluded).any():
            LOG.debug("group %d (modules %s) left out: it touches a module that exclude/protect_inputs/filter_fn keeps",
                      group.index, group_labels(graph, [group]))
            continue
        groups.append(group)
    if config.exact_only or (config.exact_only is None and config.target is None):
        inexact = [g for g in groups if not g.exact]
        groups = [g for g in groups if g.exact]
        if inexact:
            LOG.info("%d inexact group(s) left out (%s): exact_only=%s", len(inexact), group_labels(graph, inexact),
                     config.exact_only)
        if inexact and config.exact_only is None and not quiet:
            warnings.warn(f"{len(inexact)} inexact group(s) left unpruned ({group_labels(graph, inexact)}): their "
                          f"channels feed a statistic over the channel dimension (LayerNorm, RMSNorm, softmax, "
                          f"mean), so removing them is not identical to zeroing them; PruneConfig(exact_only=False) "
                          f"includes them", InexactGroupsWarning, stacklevel=3)
    return groups


class InexactGroupsWarning(UserWarning):
    """The default (``exact_only=None``) left inexact groups out, or a target needed them."""


def group_labels(graph: DependencyGraph, groups: list[Group], limit: int = 3) -> str:
    """The modules whose parameters the groups prune, the first ``limit`` of them, for messages."""
    names: list[str] = []
    for group in groups:
        for param, _ in group.params:
            module = param.rsplit(".", 1)[0] if "." in param else "<root>"
            if module not in names:
                names.append(module)
    more = f" and {len(names) - limit} more modules" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_ratio_patterns(graph: DependencyGraph, names: dict[str, str], config: PruneConfig) -> None:
    """Refuse a ``PruneConfig.ratios`` glob that matches no module name: it would silently do
    nothing (``op_names``, ``exclude`` and ``protect_inputs`` are refused the same way)."""
    for pattern in config.ratios or {}:
        if isinstance(pattern, int) and not isinstance(pattern, bool):
            if not any(g.index == pattern for g in graph.groups):
                raise ValueError(f"PruneConfig.ratios[{pattern}] names no group of {type(graph.model).__name__} "
                                 f"(group ids are 0..{len(graph.groups) - 1})")
            continue
        if not isinstance(pattern, str):
            raise TypeError(f"PruneConfig.ratios[{pattern!r}]: keys are module globs (str) or group ids (int)")
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"PruneConfig.ratios[{pattern!r}] matches no module of {type(graph.model).__name__}")


def blocked_message(graph: DependencyGraph, atoms: np.ndarray, patterns) -> str:
    """Say which op keeps the requested modules' channels from being pruned, and what to do."""
    blockers = graph.explain(atoms)
    if blockers:
        causes = "; ".join(str(b) for b in blockers)
        advice = "register a rule for the op with torchslim.op_rule, or exclude the module"
    else:
        causes = "they reach the model's inputs or outputs, whose shapes are kept"
        advice = "choose inner layers"
    return f"the output channels of {list(patterns)!r} cannot be pruned: {causes}. To proceed: {advice}."


def atoms_of_matching(graph: DependencyGraph, names: dict[str, str], patterns, field: str, inputs: bool = False) -> np.ndarray:
    """Atoms of the modules whose name (``names``: any name -> canonical name) matches a pattern."""
    matched = sorted({canonical for n, canonical in names.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)})
    if not matched:
        raise ValueError(f"PruneConfig.{field} {list(patterns)!r} matches no module of {type(graph.model).__name__}")
    atoms = [graph.module_input_atoms(n) if inputs else graph.module_output_atoms(n) for n in matched]
    return np.concatenate(atoms) if atoms else np.zeros(0, dtype=np.int64)


def keep_count(n: int, ratio: float, config: PruneConfig, round_to: int | str | None = None,
               atom_width: int = 1) -> int:
    """Atoms to keep of ``n`` at ``ratio``: a multiple of ``round_to`` channels, where each atom
    is ``atom_width`` channels (an attention head of 64 dims is already a multiple of 8)."""
    round_to = config.round_to if round_to is None else round_to
    step = round_to // math.gcd(round_to, atom_width) if isinstance(round_to, int) else 1  # "latency": later
    keep = int(np.ceil(n * (1.0 - ratio) / step) * step)
    return max(min(keep, n), min(config.min_channels, n))


# the default under a MACs target: channel counts in multiples of 8 suit CPU kernels (oneDNN's
# blocked layouts, AVX registers) and GPU tensor cores alike
HARDWARE_WIDTH = 8


def default_ranking(config: PruneConfig) -> str:
    """How atoms compete under ``config``: ``latency_aware`` (measured table) or
    ``global_ranking`` as asked; with neither set and a MACs target, by time saved per MAC
    saved on the shape-based cost estimate (``"latency_per_mac"`` without a table), so that the
    MACs budget is spent where the time per MAC is highest; otherwise each group alike.
    (Importance per millisecond saved, ``"latency"``, measured slower at the same MACs:
    latency/MACs 1.20 against 1.13 on ResNet-50, 1.24 against 1.06 on MODNet at 512x512.
    Time per MAC ignores importance inside the cap, so the cap counts against the width before
    any pruning: pruned in four steps the demo's CNN keeps its accuracy.)"""
    if config.latency_aware:
        return "latency"
    if config.global_ranking:
        return "global"
    if config.latency_aware is None and config.target_macs is not None:
        return "latency_per_mac"
    return "per_group"


def default_round_to(config: PruneConfig) -> int | str:
    """``config.round_to``, or where it is left unset, multiples of ``HARDWARE_WIDTH`` channels
    under the default MACs-target ranking and single channels otherwise."""
    if config.round_to is not None:
        return config.round_to
    return HARDWARE_WIDTH if _estimated_time_ranking(config) else 1


# the default MACs-target ranking spends the budget where the time per MAC is; uncapped it cuts such
# layers to a few channels (MobileNetV2's expansions 960 -> 56), and at 75% two pruning steps
# left the demo's digits CNN 8 hidden units (accuracy 0.82 after fine-tuning, against 0.99):
# each group keeps at least 40% of its channels unless the config says otherwise or the target
# cannot be met so (then the cap is lifted, before inexact groups are added)
DEFAULT_MAX_SPARSITY = 0.6


def default_max_sparsity(config: PruneConfig) -> float:
    """``config.max_sparsity_per_layer``, or where it is left unset, ``DEFAULT_MAX_SPARSITY``
    under the default MACs-target ranking and no cap otherwise."""
    if config.max_sparsity_per_layer is not None:
        return float(config.max_sparsity_per_layer)
    return DEFAULT_MAX_SPARSITY if _estimated_time_ranking(config) else 1.0


def _estimated_time_ranking(config: PruneConfig) -> bool:
    return config.latency_aware is None and default_ranking(config) == "latency_per_mac"


LATENCY_ROUNDINGS = (4, 8, 16, 32)
TIE_TOLERANCE = 0.02


SELECTOR_CHOICES = frozenset({"ranking", "round_to", "latency_goal_ms", "measured_choice"})


class Selector:
    """Ranks the atoms of eligible groups once, then answers "which atoms at this ratio?".

    ``ranking`` is how atoms compete: ``"per_group"`` (each group loses the same ratio),
    ``"global"`` (across groups, per MAC/param saved under a target), ``"latency"`` (across
    groups, per millisecond the latency table, or without one the shape-based estimate
    ``CostModel``, says is saved) or ``"latency_per_mac"`` (across
    groups, per millisecond saved for each MAC saved: under a MACs target, the removal that
    meets it and saves the most time, e.g. memory-bound depthwise layers at high resolution
    before the compute-bound 1x1 convs the MACs count favours); it and ``round_to`` start from
    the config; :meth:`choosing` returns a selector with another choice (e.g. the ranking whose
    removal measured fastest), so a search never changes the one it was given.
    """

    def __init__(self, graph: DependencyGraph, groups: list[Group], scores: dict[int, np.ndarray], config: PruneConfig,
                 latency=None, *, comparable: bool = False):
        self.graph, self.groups, self.config = graph, groups, config
        self.comparable = comparable  # scores share one unit across groups: global ranking leaves them as they are
        self.latency = latency  # torchslim.latency.LatencyModel when the config needs one
        self.scores = scores
        self.order = {g.index: g.atoms[np.argsort(scores[g.index], kind="stable")] for g in groups}
        # exact_only=None: exact groups first; inexact ones wait until a target cannot be met without them
        self.held_inexact = [g for g in groups if not g.exact] if config.exact_only is None else []
        if self.held_inexact:
            self.groups = [g for g in groups if g.exact]
        self.group_ratio = self._group_ratios(groups)
        self.macs_before = estimate_macs(graph)
        self.params_before = estimate_params(graph)
        self.ranking = default_ranking(config)
        self.round_to: int | str = default_round_to(config)
        self.max_sparsity = default_max_sparsity(config)
        # the default cap counts against the model as built: what earlier prunings removed
        self.already_removed = _share_already_removed(graph, groups) if config.max_sparsity_per_layer is None else {}
        self._estimate: Any = None  # CostModel: the time model when no latency table was measured
        self._costs: dict[str, dict[int, float]] = {}
        self._saved: dict[str, dict[int, float]] = {}  # unit -> per group, what one atom saves
        self.latency_goal_ms: float | None = None  # target_latency as handed to the table, once calibrated
        # target_latency: the removal calibration measured closest to the target, when it lies
        # between two of the table's proposals (ratio, atoms); select() returns it
        self.measured_choice: tuple[float, np.ndarray] | None = None

    def relaxed(self, **changes) -> "Selector":
        """This selector with some config fields changed (scores, rankings and costs shared)."""
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, **changes)
        if "round_to" in changes:
            other.round_to = default_round_to(other.config)
        if "max_sparsity_per_layer" in changes:
            other.max_sparsity = default_max_sparsity(other.config)
        if "ratios" in changes:
            other.group_ratio = other._group_ratios(self.groups)
        return other

    def group_cap(self, group: Group) -> float:
        """The most ``group`` may lose now: ``max_sparsity`` (the default cap counted against
        the width the group had before any pruning, so that pruning in steps cannot thin a
        layer further than one prune would), the search's limit and its ``PruneConfig.ratios``."""
        cap = self.max_sparsity
        before = self.already_removed.get(group.index, 0.0)
        if cap < 1.0 and before > 0.0:
            cap = max(0.0, 1.0 - (1.0 - cap) / (1.0 - before))
        own = self.group_ratio[group.index]
        return min(cap, TARGET_SEARCH_MAX_RATIO, 1.0 if own is None else own)

    def choosing(self, **choices) -> "Selector":
        """This selector with some of its choices replaced: ``ranking``, ``round_to``,
        ``latency_goal_ms`` (the goal handed to the latency table) or ``measured_choice`` (a
        removal measured closest to a latency target, returned by ``select``). Scores and cached
        costs are shared; the searches outside (``torchslim.search``) change a selector only so."""
        unknown = set(choices) - SELECTOR_CHOICES
        if unknown:
            raise TypeError(f"Selector.choosing: unknown choice(s) {sorted(unknown)}; one of {sorted(SELECTOR_CHOICES)}")
        other = copy.copy(self)
        for name, value in choices.items():
            setattr(other, name, value)
        return other

    def include_inexact(self, field: str, value: float, left: float) -> None:
        """Add the held-back inexact groups, saying so: exact groups alone leave ``left`` (a
        fraction of the original) of what ``field`` targets."""
        warnings.warn(f"PruneConfig.{field}={value} cannot be met with exact groups alone (they leave {left:.1%}): "
                      f"{len(self.held_inexact)} inexact group(s) are pruned too "
                      f"({group_labels(self.graph, self.held_inexact)}), where the pruned model differs from the "
                      f"zeroed original (LayerNorm/RMSNorm/softmax statistics); exact_only=True refuses instead",
                      InexactGroupsWarning, stacklevel=4)
        self.groups = self.groups + self.held_inexact
        self.held_inexact = []
        self._costs.clear()
        self._saved.clear()

    # per-group ratios ---------------------------------------------------------------
    def _group_ratios(self, groups: list[Group]) -> dict[int, float | None]:
        """Per group, the first ``PruneConfig.ratios`` key naming it: its id, or a glob matching
        a module (by any of its names) whose output channels are in the group; None if none."""
        ratios = self.config.ratios or {}
        keys = [(pattern, float(ratio), None if isinstance(pattern, int) and not isinstance(pattern, bool)
                 else self._glob_atoms(pattern)) for pattern, ratio in ratios.items()]
        out: dict[int, float | None] = {}
        for group in groups:
            out[group.index] = next((ratio for pattern, ratio, atoms in keys
                                     if (pattern == group.index if atoms is None else atoms[group.atoms].any())), None)
        return out

    def _glob_atoms(self, pattern: object) -> np.ndarray:
        """Per atom: is it an output channel of a module matching ``pattern`` (by any of its names)."""
        mask = np.zeros(self.graph.n_atoms, dtype=bool)
        if not isinstance(pattern, str):
            return mask
        canonical = {c for name, c in module_aliases(self.graph.model).items() if fnmatch.fnmatchcase(name, pattern)}
        for name in canonical:
            mask[self.graph.module_output_atoms(name)] = True
        return mask

    # selection ------------------------------------------------------------------------
    def remove_at(self, ratio: float, banned: np.ndarray) -> np.ndarray:
        if self.ranking != "per_group":
            return self._global(ratio, banned)
        removed = []
        for group in self.groups:
            group_ratio = self.group_ratio[group.index]
            if group_ratio is None:
                group_ratio = ratio
            elif self.config.target is not None:  # the search raises every group's ratio; this one stops at its own
                group_ratio = min(group_ratio, ratio)
            ranked = self.order[group.index]
            candidates = ranked[~banned[ranked]]
            keep = keep_count(len(ranked), group_ratio, self.config, self.round_to, self.graph.atom_width(group))
            n_remove = min(len(ranked) - keep, len(candidates))
            if n_remove > 0 and self.round_to == "latency":
                n_remove = len(ranked) - self._fastest_width(group, len(ranked) - n_remove, candidates)
            if n_remove > 0:
                removed.append(protect_slots(self.graph, group, candidates, n_remove, self.config.min_channels))
        return np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)

    def _fastest_width(self, group: Group, keep: int, candidates: np.ndarray) -> int:
        """Among ``keep`` and its roundings up, the kept width the latency table says is fastest
        (a wider width wins within 2%): removing channels never makes the layer slower."""
        n = len(group)
        options = sorted({keep} | {min(n, int(np.ceil(keep / r) * r)) for r in LATENCY_ROUNDINGS})
        best, best_ms = keep, float("inf")
        for width in options:
            removed = candidates[: n - width]
            ms = self.latency.predict_layers(removed, only=group.atoms)
            if ms <= best_ms * (1 + TIE_TOLERANCE):
                best, best_ms = width, min(ms, best_ms)
        return best

    def _global(self, ratio: float, banned: np.ndarray) -> np.ndarray:
        atoms, values, owners, caps = [], [], [], {}
        costs = self._atom_costs() if (self.config.target_macs or self.config.target_params
                                       or self.config.target_latency or self.ranking != "global") else None
        for group in self.groups:
            score = self.scores[group.index]
            normalized = score if self.comparable else score / (np.mean(np.abs(score)) or 1.0)
            if costs is not None:
                normalized = normalized / max(costs[group.index], 1e-12)
            ok = ~banned[group.atoms]
            atoms.append(group.atoms[ok])
            values.append(normalized[ok])
            owners.append(np.full(int(ok.sum()), group.index))
            cap_ratio = self.group_cap(group)
            caps[group.index] = len(group) - keep_count(len(group), cap_ratio, self.config, self.round_to,
                                                        self.graph.atom_width(group))
        if not atoms:
            return np.zeros(0, dtype=np.int64)
        atoms_a, values_a, owners_a = np.concatenate(atoms), np.concatenate(values), np.concatenate(owners)
        total = int(ratio * sum(len(g) for g in self.groups))
        order = np.argsort(values_a, kind="stable")
        taken: dict[int, list[int]] = {}
        for index in order:
            if total <= 0:
                break
            owner = int(owners_a[index])
            if len(taken.setdefault(owner, [])) < caps[owner]:
                taken[owner].append(int(atoms_a[index]))
                total -= 1
        removed = []
        by_index = {g.index: g for g in self.groups}
        for owner, chosen in taken.items():
            group = by_index[owner]
            ranked = np.asarray(chosen[:self._rounded_removal(group, len(chosen))], dtype=np.int64)
            removed.append(protect_slots(self.graph, group, ranked, len(ranked), self.config.min_channels))
        return np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)

    def measure_for_target(self):
        """(field, value, measure(graph, removed), value of the unpruned model) for the config's target."""
        target = self.config.target
        if target is None:
            raise ValueError("PruneConfig has no target (target_macs, target_params or target_latency)")
        if target.quantity == "macs":
            return target.field, target.value, estimate_macs, self.macs_before
        if target.quantity == "params":
            return target.field, target.value, estimate_params, self.params_before
        return target.field, target.value, _latency_measure(self.latency), self.latency.measured_ms

    def _atom_costs(self) -> dict[int, float]:
        """What removing an atom of each group saves, in the ranking's unit (MACs or params under
        ``global``, milliseconds under ``latency``, milliseconds per MAC under ``latency_per_mac``)."""
        if self.ranking not in self._costs:
            if self.ranking == "latency_per_mac":
                ms, macs = self._savings("latency"), self._savings("macs")
                self._costs[self.ranking] = {g: ms[g] / macs[g] if macs[g] > 0 else 0.0 for g in ms}
            else:
                self._costs[self.ranking] = self._savings("latency" if self.ranking == "latency" else "target")
        return self._costs[self.ranking]

    def _savings(self, unit: str) -> dict[int, float]:
        """Per group, what one atom saves (from removing half of the group on the graph)."""
        if unit not in self._saved:
            self._saved[unit] = self._measure_savings(unit)
        return self._saved[unit]

    def time_model(self):
        """The measured latency table when the config asked for one, else the shape-based
        estimate (``torchslim.latency.lut.CostModel``), built on first use."""
        if self.latency is not None:
            return self.latency
        if self._estimate is None:
            from torchslim.latency.lut import CostModel

            self._estimate = CostModel(self.graph)
        return self._estimate

    def _measure_savings(self, unit: str) -> dict[int, float]:
        if unit == "latency":
            measure = _latency_measure(self.time_model())
        elif unit == "macs":
            measure = estimate_macs
        else:
            measure = self.measure_for_target()[2]
        base = measure(self.graph)
        savings = {}
        for group in self.groups:
            half = group.atoms[: max(1, len(group) // 2)]
            savings[group.index] = max(base - measure(self.graph, half), 0) / len(half)
        return savings

    def absolute_target(self) -> float:
        """The config's target in its own unit: a fraction (<= 1) times the unpruned value."""
        _, value, _, before = self.measure_for_target()
        return value * before if value <= 1 else value

    def select(self, banned: np.ndarray) -> tuple[float, np.ndarray]:
        """(ratio, atoms): the config's ratio, or the smallest ratio meeting its target."""
        config = self.config
        if self.config.target is None:
            return config.ratio, self.remove_at(config.ratio, banned)
        if self.measured_choice is not None:
            ratio, atoms = self.measured_choice
            return ratio, atoms[~banned[atoms]]
        field, value, measure, before = self.measure_for_target()
        target = self.absolute_target()
        if field == "target_latency" and self.latency_goal_ms is not None:
            target = self.latency_goal_ms
        lo, hi = 0.0, TARGET_SEARCH_MAX_RATIO
        best = self.remove_at(hi, banned)
        if measure(self.graph, best) > target and self.max_sparsity < 1.0 and config.max_sparsity_per_layer is None:
            LOG.info("the default per-group cap (%.0f%%) cannot meet %s=%s: lifted", 100 * self.max_sparsity, field,
                     value)
            self.max_sparsity = 1.0  # the default cap gives way to the target (before inexact groups do)
            best = self.remove_at(hi, banned)
        if measure(self.graph, best) > target and self.held_inexact:
            self.include_inexact(field, value, measure(self.graph, best) / before)
            best = self.remove_at(hi, banned)
        if measure(self.graph, best) > target:
            raise ValueError(f"PruneConfig.{field}={value} cannot be met: the most this config allows leaves "
                             f"{measure(self.graph, best) / before:.1%} of the original")
        best_ratio, short = hi, np.zeros(0, dtype=np.int64)  # short: the largest removal found missing the target
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) / 2
            candidate = self.remove_at(mid, banned)
            if measure(self.graph, candidate) <= target:
                hi, best, best_ratio = mid, candidate, mid
            else:
                lo, short = mid, candidate
        return best_ratio, self.fill_towards_target(short, best, lambda removed: measure(self.graph, removed), target,
                                                    banned)

    def fill_towards_target(self, short: np.ndarray, enough: np.ndarray, measure, target: float,
                            banned: np.ndarray | None = None) -> np.ndarray:
        """The smallest removal between ``short`` (misses the target) and ``enough`` (meets it):
        ``short`` plus the first steps of ``enough``'s extra atoms that meet it.

        The ratio search moves every group together, so where a group's atoms are coarse (a
        ViT with 6 heads per block steps all blocks by a sixth of their attention at once) the
        removal meeting the target can overshoot it by several percent. Taking the extra atoms
        a step at a time (steps keep ``round_to`` widths; groups advance evenly, each by its
        own ranking) lands within one step of the target."""
        if short.size == 0 and enough.size == 0 or not np.isin(short, enough).all():
            return enough
        steps = self._steps_between(short, enough)
        lo, hi = 0, len(steps)  # short + steps[:hi] meets the target, short + steps[:lo] does not
        while hi - lo > 1:
            k = (lo + hi) // 2
            if measure(np.concatenate([short] + steps[:k])) <= target:
                hi = k
            else:
                lo = k
        if hi == 0:
            return short
        return self._closest_last_step(np.concatenate([short] + steps[:hi - 1]), steps[hi - 1], measure, target,
                                       banned)

    def _closest_last_step(self, base: np.ndarray, last: np.ndarray, measure, target: float,
                           banned: np.ndarray | None) -> np.ndarray:
        """``base`` (misses the target) plus the one next step that meets it leaving the most:
        ``last``, or the next step of any other group (in its ranking order, within its cap).
        A step of 8 channels in a narrow full-resolution layer can be 3% of a model's MACs;
        another group's step may land closer."""
        best, best_left = np.concatenate([base, last]), measure(np.concatenate([base, last]))
        removed = np.zeros(self.graph.n_atoms, dtype=bool)
        removed[base] = True
        unavailable = removed if banned is None else removed | banned
        for group in self.groups:
            step = self._next_step(group, removed, unavailable)
            if step is None:
                continue
            candidate = np.concatenate([base, step])
            left = measure(candidate)
            if best_left < left <= target:
                best, best_left = candidate, left
        return best

    def _next_step(self, group: Group, removed: np.ndarray, unavailable: np.ndarray) -> np.ndarray | None:
        """The group's next atoms to remove after ``removed`` (a ``round_to`` step in its ranking
        order, skipping ``unavailable`` ones), or None where that would pass its cap or empty one
        of its layers."""
        ranked = self.order[group.index]
        taken, free = ranked[removed[ranked]], ranked[~unavailable[ranked]]
        kept = len(group) - taken.size
        size = self._step_size(group, kept, free.size)
        floor = keep_count(len(group), self.group_cap(group), self.config, self.round_to, self.graph.atom_width(group))
        if size == 0 or kept - size < floor:
            return None
        wanted = np.concatenate([taken, free[:size]])
        if protect_slots(self.graph, group, wanted, wanted.size, self.config.min_channels).size < wanted.size:
            return None
        return free[:size]

    def _steps_between(self, short: np.ndarray, enough: np.ndarray) -> list[np.ndarray]:
        """``enough``'s atoms beyond ``short``, per group in its ranking order, cut where the
        group's kept width is a multiple of ``round_to`` (the whole extra for ``"latency"``),
        the steps of all groups ordered by the share of their group removed after them."""
        extra = np.setdiff1d(enough, short)
        owners = self.graph.atom_group[extra]
        removed = np.zeros(self.graph.n_atoms, dtype=bool)
        removed[short] = True
        by_index = {g.index: g for g in self.groups}
        keyed = []
        for owner in np.unique(owners):
            group = by_index[int(owner)]
            rank = np.empty(self.graph.n_atoms, dtype=np.int64)
            rank[self.order[group.index]] = np.arange(len(group))
            mine = extra[owners == owner]
            mine = mine[np.argsort(rank[mine], kind="stable")]
            kept = len(group) - int(removed[group.atoms].sum())
            start = 0
            while start < mine.size:
                size = self._step_size(group, kept, mine.size - start)
                start, kept = start + size, kept - size
                keyed.append(((len(group) - kept) / len(group), mine[start - size:start]))
        keyed.sort(key=lambda item: item[0])
        return [atoms for _, atoms in keyed]

    def _rounded_removal(self, group: Group, count: int) -> int:
        """At most ``count`` atoms of ``group``, fewer where needed to keep a multiple of
        ``round_to`` channels (or the whole group): global rankings take atoms one by one."""
        if not isinstance(self.round_to, int):
            return count
        step = self.round_to // math.gcd(self.round_to, self.graph.atom_width(group))
        keep = min(len(group), -(-(len(group) - count) // step) * step)
        return len(group) - keep

    def _step_size(self, group: Group, kept: int, left: int) -> int:
        """Atoms to remove next from a group keeping ``kept`` so that its width stays a multiple
        of ``round_to`` channels (at most ``left``)."""
        if not isinstance(self.round_to, int):
            return left
        step = self.round_to // math.gcd(self.round_to, self.graph.atom_width(group))
        return min(left, kept % step or step)


def _latency_measure(latency):
    return lambda graph, removed=None: latency.predict(removed)


def protect_slots(graph: DependencyGraph, group: Group, ranked: np.ndarray, n_remove: int, min_keep: int) -> np.ndarray:
    """The ``n_remove`` lowest-ranked atoms, skipping any whose removal would empty a layer.

    A group can span several layers (a DenseNet concat feeds one norm from many convs), so
    each parameter slot keeps at least ``min_keep`` of its own indices.
    """
    chosen = np.zeros(graph.n_atoms, dtype=bool)
    chosen[ranked[:n_remove]] = True
    for name, dim in group.params:
        labels = graph.param_labels(name, dim)
        labels = labels[graph.atom_group[labels] == group.index]
        kept = int((~chosen[labels]).sum())
        if kept >= min_keep or labels.size == 0:
            continue
        for atom in ranked[:n_remove][::-1]:  # give back the most important removed atoms first
            if chosen[atom] and np.isin(atom, labels):
                chosen[atom] = False
                kept += int((labels == atom).sum())
                if kept >= min_keep:
                    break
    return ranked[chosen[ranked]]


def estimate_params(graph: DependencyGraph, removed_atoms: np.ndarray | None = None) -> int:
    """Trainable parameters after removing ``removed_atoms`` (from the graph, nothing runs)."""
    removed = np.zeros(graph.n_atoms, dtype=bool)
    if removed_atoms is not None and len(removed_atoms):
        removed[np.asarray(removed_atoms, dtype=np.int64)] = True
    trainable = graph.parameters()
    shapes = graph.shapes_after(removed)
    total = 0
    for name, node in graph.trace.param_nodes.items():
        if name in trainable:
            total += int(np.prod(shapes[node]))
    untraced = sum(p.numel() for n, p in trainable.items() if n not in graph.trace.param_nodes)
    return total + untraced


class NothingPrunedWarning(UserWarning):
    """``prune_`` removed nothing: a setting (named in the message) prevents every removal."""


# fields that narrow which groups may be pruned, and the value that narrows nothing
_GROUP_FILTERS: tuple[tuple[str, Any], ...] = (("op_names", None), ("exclude", ()), ("protect_inputs", ()), ("filter_fn", None),
                  ("exact_only", False))
# fields that limit how much a group loses, and the value that limits least
_AMOUNT_LIMITS = (("round_to", 1), ("min_channels", 1), ("ratios", None), ("max_sparsity_per_layer", 1.0))


def warn_nothing_pruned(selector: "Selector", banned: np.ndarray) -> None:
    """Say, with ``NothingPrunedWarning``, which setting made the selection empty."""
    warnings.warn(f"prune_ removed nothing: {nothing_pruned_reason(selector, banned)}", NothingPrunedWarning,
                  stacklevel=3)


def nothing_pruned_reason(selector: "Selector", banned: np.ndarray) -> str:
    """Why ``selector`` selects no atom: the setting that prevents it, found by relaxing each one."""
    graph, config = selector.graph, selector.config
    if not graph.groups:
        return ("no channel of the model can be pruned: every one is pinned by an op without a rule "
                "or reaches the model's inputs or outputs (torchslim.analyze shows which)")
    if not selector.groups:
        culprits = [f"PruneConfig.{field}" for field, loosest in _GROUP_FILTERS
                    if getattr(config, field) != loosest and
                    eligible_groups(graph, dataclasses.replace(config, **{field: loosest}), quiet=True)]
        return (f"{' and '.join(culprits) or 'the config'} leave{'s' if len(culprits) < 2 else ''} none of the "
                f"model's {len(graph.groups)} prunable groups")
    if banned.any():
        return "every removal was rolled back (PruneResult.skipped says why)"
    if selector.config.target is not None:
        field, value, _, _ = selector.measure_for_target()
        return f"PruneConfig.{field}={value} is already met by the unpruned model"
    for field, loosest in _AMOUNT_LIMITS:
        if getattr(config, field) != loosest and selector.relaxed(**{field: loosest}).remove_at(config.ratio, banned).size:
            largest = max(len(g) * graph.atom_width(g) for g in selector.groups)
            return (f"PruneConfig.{field}={getattr(config, field)!r} keeps every channel "
                    f"(the largest prunable group has {largest} channels)")
    if not config.ratio:
        return "PruneConfig.ratio=0 asks for no removal"
    return f"PruneConfig.ratio={config.ratio} is less than one channel of every group"


def _share_already_removed(graph: DependencyGraph, groups: list[Group]) -> dict[int, float]:
    """Per group, the share of its channels earlier prunings of the model removed (from the
    model's pruning history: the first step that shrank one of the group's tensors recorded
    that tensor's shape before), for groups that lost any."""
    steps = pruning_history(graph.model).steps
    if not steps:
        return {}
    shares = {}
    for group in groups:
        for name, dims in graph.removal(group.atoms[:1]).items():
            original = next((step.shapes[name] for step in steps if name in step.shapes), None)
            if original is None:
                continue
            dim = next(iter(dims))
            now = graph.trace.nodes[graph.trace.param_nodes[name]].shape[dim]
            if original[dim] > now:
                shares[group.index] = 1.0 - now / original[dim]
            break
    return shares
