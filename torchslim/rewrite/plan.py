"""Choosing what to rewrite: named layers at a given setting, or a MACs budget met by the
settings with the least fit error per MAC saved; the per-layer plan is a table to read before
applying it.

Budget planner: every eligible layer offers its settings (``methods.Method.settings``), each
with the MACs it saves and its relative fit error e. Starting from no rewrite, the planner
repeatedly takes the step (a layer moved to a cheaper setting) with the least increase in
discarded energy e^2 per MAC saved until the model's MACs are at or under the target, the
marginal-cost greedy of rate-distortion bit allocation (energies add up across layers; the
analysis's lesson that a few layers hold most MACs makes the big layers cheap per MAC saved).
A last pass gives back what overshoots: while the target still holds, the layer whose move to a
milder setting removes the most error takes it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Sequence

import torch
from torch import nn

from torchslim._inputs import call_model
from torchslim.modes import training_mode
from torchslim.rewrite.fold import SideFold
from torchslim.rewrite.methods import METHODS, Method


@dataclasses.dataclass
class LayerPlan:
    """One layer's rewrite: its setting (rank, multiplier or groups), MACs before/after and fit
    error; for a grouped rewrite once applied, whether each side's shuffle was folded and why."""

    name: str
    module_type: str
    method: str
    setting: int
    macs_before: int
    macs_after: int
    fit_error: float
    folds: dict[str, SideFold] = dataclasses.field(default_factory=dict)

    @property
    def macs_saved(self) -> int:
        return self.macs_before - self.macs_after


@dataclasses.dataclass
class RewritePlan:
    """The layers to rewrite and the model's MACs before and (predicted) after."""

    layers: list[LayerPlan]
    model_macs: int

    @property
    def macs_after(self) -> int:
        """The model's MACs once every layer is rewritten."""
        return self.model_macs - sum(layer.macs_saved for layer in self.layers)

    def table(self) -> str:
        """The per-layer plan as a plain-text table."""
        head = ("layer", "type", "rewrite", "setting", "MACs before", "MACs after", "saved", "fit error")
        rows = [(p.name, p.module_type, p.method, _setting(p), f"{p.macs_before:,}", f"{p.macs_after:,}",
                 f"{p.macs_saved / max(p.macs_before, 1):.0%}", f"{p.fit_error:.4f}") for p in self.layers]
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
        share = self.macs_after / max(self.model_macs, 1)
        lines.append(f"model MACs {self.model_macs:,} -> {self.macs_after:,} ({share:.1%})")
        lines += [f"{p.name} {side}: {fold}" for p in self.layers for side, fold in p.folds.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _setting(p: LayerPlan) -> str:
    name = METHODS[p.method].setting_name
    return "-" if name == "-" else f"{name}={p.setting}"


def select_layers(model: nn.Module, method: Method, modules: Sequence[str], exclude: Sequence[str],
                  filter_fn: Callable[[str, nn.Module], bool] | None) -> list[str]:
    """The layers to consider: those matching ``modules`` (all when empty) that the rewrite takes.

    A name given without wildcards must be rewritable (``ValueError`` naming it and why not);
    a glob skips what the rewrite cannot take but must match at least one layer it can.
    """
    named = dict(model.named_modules())
    chosen: list[str] = []
    for pattern in modules:
        if not any(ch in pattern for ch in "*?["):
            if pattern not in named or not pattern:
                raise ValueError(f"{type(model).__name__} has no module {pattern!r} to rewrite")
            problem = method.why_not(named[pattern])
            if problem is not None:
                raise ValueError(f"cannot rewrite '{pattern}' as {method.name}: {problem}")
            chosen.append(pattern)
            continue
        hits = [n for n in named if n and fnmatch.fnmatchcase(n, pattern) and method.why_not(named[n]) is None]
        if not hits:
            raise ValueError(f"no module matching {pattern!r} can be rewritten as {method.name}")
        chosen += hits
    if not modules:
        chosen = [n for n, m in named.items() if n and method.why_not(m) is None]
    keep = [n for n in dict.fromkeys(chosen) if not any(fnmatch.fnmatchcase(n, p) for p in exclude)
            and (filter_fn is None or filter_fn(n, named[n]))]
    if not keep:
        raise ValueError(f"no layer of {type(model).__name__} is left to rewrite as {method.name}")
    return keep


@torch.no_grad()
def output_positions(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, int]:
    """Output positions per layer on ``example_inputs`` (output elements / output channels, over every call)."""
    positions: dict[str, int] = dict.fromkeys(names, 0)

    def hook_for(name: str):
        def hook(module: Any, args: tuple, output: torch.Tensor) -> None:
            channels = module.weight.shape[0]
            positions[name] += output.numel() // channels
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with training_mode(model, False):  # eval: BatchNorm statistics are read, never updated
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return positions


def fixed_plan(model: nn.Module, method: Method, names: list[str], setting: int, positions: dict[str, int],
               moments: dict[str, torch.Tensor], model_macs: int) -> RewritePlan:
    """Every named layer at ``setting`` (checked against each layer first)."""
    rows = []
    for name in names:
        module = model.get_submodule(name)
        check_setting(method, name, module, setting)
        errors = method.errors(module, moments.get(name))
        rows.append(_row(name, module, method, setting, positions[name], errors[setting]))
    return RewritePlan(rows, model_macs)


def check_setting(method: Method, name: str, module: Any, setting: int) -> None:
    """``ValueError`` naming the layer when ``setting`` does not fit it."""
    if isinstance(setting, bool) or not isinstance(setting, int):
        raise ValueError(f"the {method.setting_name} must be an integer, got {setting!r}")
    top = method.max_setting(module)
    if setting < 1 or setting > top:
        raise ValueError(f"cannot rewrite '{name}' as {method.name}: {method.setting_name}={setting} is outside "
                         f"1..{top} for this {type(module).__name__} ({_shape(module)})")
    problem = method.check_setting(module, setting)
    if problem is not None:
        raise ValueError(f"cannot rewrite '{name}' as {method.name}: {problem}")


def _shape(module: Any) -> str:
    w = module.weight
    return f"weight {tuple(w.shape)}"


def _row(name: str, module: Any, method: Method, setting: int, positions: int, error: float) -> LayerPlan:
    return LayerPlan(name, type(module).__name__, method.name, setting,
                     method.macs_per_position(module, None) * positions,
                     method.macs_per_position(module, setting) * positions, float(error))


def budget_plan(model: nn.Module, method: Method, names: list[str], positions: dict[str, int],
                moments: dict[str, torch.Tensor], model_macs: int, target_macs: int) -> RewritePlan:
    """The settings meeting ``target_macs`` with the least fit error per MAC saved (marginal greedy)."""
    options: dict[str, list[LayerPlan]] = {}
    for name in names:
        module = model.get_submodule(name)
        settings = method.settings(module)
        if not settings or not positions[name]:
            continue
        errors = method.errors(module, moments.get(name))
        options[name] = sorted((_row(name, module, method, s, positions[name], errors[s]) for s in settings),
                               key=lambda r: r.macs_saved)
    current: dict[str, LayerPlan] = {}
    macs = model_macs
    while macs > target_macs:
        step = _cheapest_step(options, current)
        if step is None:
            best = model_macs - sum(o[-1].macs_saved for o in options.values())
            raise ValueError(f"target_macs={target_macs:,} cannot be met by rewriting {', '.join(names)} as "
                             f"{method.name}: the most it reaches is {best:,} of {model_macs:,} MACs")
        before = current.get(step.name)
        macs -= step.macs_saved - (before.macs_saved if before else 0)
        current[step.name] = step
    _give_back(options, current, model_macs - target_macs)
    return RewritePlan([current[n] for n in names if n in current], model_macs)


def _give_back(options: dict[str, list[LayerPlan]], current: dict[str, LayerPlan], needed: int) -> None:
    """Move layers to milder settings (most error removed first) while the saving stays >= ``needed``."""
    while True:
        saved = sum(r.macs_saved for r in current.values())
        best, best_gain = None, 0.0
        for name, now in current.items():
            for row in options[name]:
                if row.macs_saved < now.macs_saved and saved - now.macs_saved + row.macs_saved >= needed:
                    gain = now.fit_error ** 2 - row.fit_error ** 2
                    if gain > best_gain:
                        best, best_gain = row, gain
        if best is None:
            return
        current[best.name] = best


def _cheapest_step(options: dict[str, list[LayerPlan]], current: dict[str, LayerPlan]) -> LayerPlan | None:
    best, best_cost = None, float("inf")
    for name, rows in options.items():
        now = current.get(name)
        saved, error = (now.macs_saved, now.fit_error) if now else (0, 0.0)
        for row in rows:
            gain = row.macs_saved - saved
            if gain <= 0:
                continue
            cost = max(row.fit_error ** 2 - error ** 2, 0.0) / gain
            if cost < best_cost:
                best, best_cost = row, cost
    return best
