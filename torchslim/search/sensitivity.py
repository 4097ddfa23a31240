"""Sensitivity analysis: each group pruned alone at ratios 0.1 ... 0.9, evaluated without
fine-tuning, then per-group ratios meeting a budget with the least predicted loss.

The curves (score of the model with only that group pruned, at each ratio) are the first
plot of most pruning guides (e.g. Li et al., "Pruning Filters for Efficient ConvNets", ICLR
2017, Fig. 2). How they are combined, documented because it is a choice:

* a group's predicted loss at ratio r is ``baseline - score``, interpolated linearly between
  the measured ratios (0 at ratio 0, extended along the last segment past 0.9); the loss of a
  candidate is the sum over groups (the groups are assumed to act independently);
* greedy by loss per unit saved: starting from nothing removed, the group whose next step (the
  next 0.05 of its atoms that changes its width) adds the least predicted loss per MAC (or
  parameter, or predicted ms, as the budget says) saved, measured on the graph with every
  other group where it stands, takes that step, until the budget is met; the last step
  overshoots by at most one step, so the chosen ratios are then scaled (keeping their
  proportions) to the least removal meeting the budget, as every candidate of a search is.

The analysis is data (JSON): re-searching a new budget from a saved one evaluates nothing,
it only measures removals on the graph (:meth:`SensitivityAnalysis.choose_for`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from torchslim.graph import Group
from torchslim.pruning import PruneConfig
from torchslim.pruning.selector import group_labels
from torchslim.search._space import SearchSpace
from torchslim.search.base import Search, SearchWarning
from torchslim.search.history import Record

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GREEDY_STEP = 0.05
FORMAT = "torchslim.sensitivity/1"


@dataclasses.dataclass
class SensitivityAnalysis:
    """Per group (by id): the score with only that group pruned at each of ``ratios``;
    ``baseline`` is the unpruned score, ``labels`` the modules each group prunes, ``sizes``
    its atom count (a saved analysis is checked against the model it is re-searched on)."""

    baseline: float
    ratios: tuple[float, ...]
    curves: dict[int, list[float]]
    labels: dict[int, str]
    sizes: dict[int, int]

    def loss(self, group: int, ratio: float) -> float:
        """Predicted loss of pruning ``group`` alone at ``ratio`` (see the module docstring)."""
        xs = np.array((0.0, *self.ratios))
        ys = self.baseline - np.array((self.baseline, *self.curves[group]), dtype=np.float64)
        ys = np.where(np.isfinite(ys), ys, np.finfo(np.float64).max / 1e6)  # a NaN/inf probe: the worst
        if ratio <= xs[-1]:
            return float(np.interp(ratio, xs, ys))
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (ratio - xs[-1]))

    def predicted_loss(self, ratios: dict[int, float]) -> float:
        """The sum of each group's predicted loss at its ratio."""
        return float(sum(self.loss(g, r) for g, r in ratios.items() if g in self.curves))

    def most_sensitive(self, k: int | None = None) -> list[int]:
        """Group ids, the largest mean predicted loss over the measured ratios first."""
        mean = {g: float(np.mean([self.loss(g, r) for r in self.ratios])) for g in self.curves}
        return sorted(mean, key=lambda g: -mean[g])[:k]

    # choosing ratios for a budget ------------------------------------------------------------
    def choose(self, space: SearchSpace) -> dict[int, float]:
        """Per-group ratios meeting ``space``'s budget with the least predicted loss (greedy by
        loss per unit saved, then scaled to the budget; see the module docstring)."""
        self._check(space)
        quantity = space.quantity
        if quantity is None:
            raise ValueError("choosing ratios needs a budget: target_macs, target_params or target_latency")
        current = {g: 0.0 for g in space.sizes}
        left = space.measure(current).get(quantity)
        top = self.ratios[-1]
        while not space.meets(space.measure(current)):
            best, best_key, best_left = None, np.inf, left
            for group, ratio in current.items():
                step = self._next_step(space, current, group, top)
                if step is None:
                    continue
                trial = {**current, group: step}
                after = space.measure(trial).get(quantity)
                saved = left - after
                if saved <= 0:
                    continue
                key = (self.loss(group, step) - self.loss(group, ratio)) / saved
                if key < best_key:
                    best, best_key, best_left = (group, step), key, after
            if best is None:  # every group at the last measured ratio: scale up from here
                break
            current[best[0]], left = best[1], best_left
        return space.meet_budget({g: r for g, r in current.items() if r > 0})

    def _next_step(self, space: SearchSpace, current: dict[int, float], group: int, top: float) -> float | None:
        """The group's next ratio on the ``GREEDY_STEP`` grid that changes its width, or None past ``top``."""
        kept = space.keep_counts(current)[group]
        ratio = current[group]
        while ratio + GREEDY_STEP <= top + 1e-9:
            ratio = round(ratio + GREEDY_STEP, 6)
            if space.keep_counts({**current, group: ratio})[group] < kept:
                return ratio
        return None

    def choose_for(self, model: nn.Module, example_inputs: Any, *, target_macs: float | None = None,
                   target_params: float | None = None, target_latency: float | None = None,
                   config: PruneConfig | None = None) -> PruneConfig:
        """Re-search a new budget from this analysis with no evaluation: the ``PruneConfig``
        (per-group ratios by group id) for ``model`` meeting the budget with the least
        predicted loss. ``config`` must give the scope and criterion the analysis was made with."""
        base = config or PruneConfig()
        budget = dataclasses.replace(base, target_macs=target_macs, target_params=target_params,
                                     target_latency=target_latency)
        space = SearchSpace(model, example_inputs, budget)
        space.check_reachable()
        return space.config_for(self.choose(space))

    def _check(self, space: SearchSpace) -> None:
        if space.sizes != self.sizes:
            raise ValueError(f"this sensitivity analysis was made on groups {self.sizes} (id: atoms), the model has "
                             f"{space.sizes}: re-run the analysis on this model (and the same scope)")

    # reports ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "baseline": self.baseline, "ratios": list(self.ratios),
                "curves": {str(g): [v if np.isfinite(v) else None for v in c] for g, c in self.curves.items()},
                "labels": {str(g): v for g, v in self.labels.items()},
                "sizes": {str(g): v for g, v in self.sizes.items()}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the analysis as JSON (what :meth:`load` reads back)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityAnalysis":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a torchslim sensitivity analysis (no format {FORMAT!r})")
        return cls(float(data["baseline"]), tuple(float(r) for r in data["ratios"]),
                   {int(g): [float("-inf") if v is None else float(v) for v in c] for g, c in data["curves"].items()},
                   {int(g): str(v) for g, v in data["labels"].items()}, {int(g): int(v) for g, v in data["sizes"].items()})

    def table(self, top: int | None = None):
        """A rich ``Table``: one row per group (the most sensitive first), its score at each ratio."""
        from rich.table import Table

        table = Table(title=f"Sensitivity (score with one group pruned; unpruned {self.baseline:.4g})")
        for column in ("group", "modules", "atoms", *(f"{r:g}" for r in self.ratios)):
            table.add_column(column, justify="left" if column == "modules" else "right")
        for group in self.most_sensitive(top):
            table.add_row(str(group), self.labels[group], str(self.sizes[group]),
                          *(f"{v:.4g}" for v in self.curves[group]))
        return table

    def plot(self, path: str | os.PathLike, highlight: int = 10) -> Path | None:
        """A PNG with one curve per group, the ``highlight`` most sensitive in colour and named;
        None (with a ``SearchWarning``) when matplotlib is not installed."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            warnings.warn("matplotlib is not installed, so the sensitivity plot is skipped (pip install matplotlib); "
                          "the table and JSON have the same numbers", SearchWarning, stacklevel=2)
            return None
        figure = Figure(figsize=(8, 5))
        axes = figure.subplots()
        marked = self.most_sensitive(highlight)
        xs = (0.0, *self.ratios)
        for group in reversed(self.most_sensitive()):
            ys = (self.baseline, *self.curves[group])
            if group in marked:
                axes.plot(xs, ys, marker="o", linewidth=1.8, label=f"{group}: {self.labels[group]}"[:48])
            else:
                axes.plot(xs, ys, color="0.75", linewidth=0.8)
        axes.set_xlabel("ratio of the group's channels removed")
        axes.set_ylabel("score (no fine-tuning)")
        axes.set_title(f"Sensitivity per group ({min(highlight, len(self.curves))} most sensitive named)")
        axes.legend(fontsize="small", loc="lower left")
        axes.grid(alpha=0.3)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120, bbox_inches="tight")
        return path


def group_label(group: Group) -> str:
    """The modules whose outputs a group prunes (parameters sliced along dim 0: conv and linear
    weights, norm affines), e.g. ``"layer1.0.conv1, layer1.0.bn1"``."""
    names = [name.rpartition(".")[0] or "<root>" for name, dim in group.params if dim == 0]
    return ", ".join(dict.fromkeys(names))


class SensitivitySearch(Search):
    """Sensitivity analysis (:meth:`analyze`), then with a budget (:meth:`run`) the ratios of
    least predicted loss meeting it, evaluated once. Needs ``1 + groups x len(ratios)`` probes
    (+1 for the chosen ratios); ``max_evals`` below that is refused up front."""

    method = "sensitivity"

    def __init__(self, *args: Any, ratios: tuple[float, ...] = RATIOS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not ratios or any(not 0.0 < r < 1.0 for r in ratios) or list(ratios) != sorted(ratios):
            raise ValueError(f"ratios must be increasing and in (0, 1), got {ratios}")
        self.ratios = tuple(float(r) for r in ratios)
        self.analysis: SensitivityAnalysis | None = None
        self._chosen: Record | None = None

    def options(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios)}

    def needed_evals(self) -> int:
        return 1 + len(self.space.sizes) * len(self.ratios) + (self.space.quantity is not None)

    def analyze(self) -> SensitivityAnalysis:
        """Evaluate every group alone at each ratio (recorded in the history; resumable)."""
        if self.history is None:  # called alone, not from run()
            self.begin()
        if self.max_evals is not None and self.max_evals < self.needed_evals():
            raise ValueError(f"sensitivity analysis needs {self.needed_evals()} evaluations "
                             f"(1 + {len(self.space.sizes)} groups x {len(self.ratios)} ratios"
                             f"{' + the chosen ratios' if self.space.quantity else ''}); max_evals={self.max_evals}")
        probes = [(group, r) for group in sorted(self.space.sizes) for r in self.ratios]
        records = self.evaluate_batch([{}] + [{group: r} for group, r in probes], meet_budget=False,
                                      notes=["unpruned"] + [f"group {group} at {r:g}" for group, r in probes])
        baseline = records[0].score
        curves: dict[int, list[float]] = {group: [] for group in sorted(self.space.sizes)}
        for (group, _), record in zip(probes, records[1:]):
            curves[group].append(record.score)
        graph = self.space.graph
        labels = {g.index: group_label(g) or group_labels(graph, [g]) for g in self.space.groups}
        self.analysis = SensitivityAnalysis(baseline, self.ratios, curves, labels, dict(self.space.sizes))
        return self.analysis

    def explore(self) -> None:
        analysis = self.analyze()
        chosen = analysis.choose(self.space)
        self._chosen = self.evaluate_ratios(chosen, meet_budget=False,
                                            note=f"chosen (predicted loss {analysis.predicted_loss(chosen):.4g})")

    def choose(self) -> Record | None:
        return self._chosen
