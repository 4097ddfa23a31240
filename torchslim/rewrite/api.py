"""Front door: ``rewrite_(model, example_inputs, RewriteConfig(...))`` changes the model in place.

Each chosen layer is replaced by a block of the same input and output shapes under the same
module name, initialised from the trained weights; all layers at once, recorded as one plan
step (``torchslim.pruning.replace_modules_``), so checkpoints record the rewrite and
``torchslim.load`` replays it on a freshly built original.
Everything is checked and fitted before the first layer is replaced: bad input raises a
``ValueError`` naming the module and leaves the model untouched.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.pruning import replace_modules_
from torchslim.rewrite._fit import Fit
from torchslim.rewrite._stats import input_moments
from torchslim.rewrite.fold import Folding, fold_shuffles_
from torchslim.rewrite.grouped import GroupedConv2d
from torchslim.rewrite.methods import METHODS
from torchslim.rewrite.plan import RewritePlan, budget_plan, fixed_plan, output_positions, select_layers


@dataclasses.dataclass(frozen=True)
class RewriteConfig:
    """How to rewrite.

    to:          ``"lowrank"`` (Linear/Conv2d -> two thinner layers), ``"separable"`` (k x k conv
                 -> depthwise + pointwise), ``"grouped"`` (conv -> grouped conv between channel
                 shuffles) or ``"dilated"`` (5x5/7x7 conv -> dilated 3x3).
    modules:     fnmatch globs (or exact names) of the layers to consider; empty: every layer the
                 rewrite takes. ``exclude`` globs and ``filter_fn(name, module) -> bool`` narrow them.
    setting:     the rank / depth multiplier / group count for every chosen layer.
    target_macs: instead of ``setting``: rewrite until the model's MACs are at most this (a
                 fraction of the original if <= 1, else absolute), choosing layers and settings
                 with the least fit error per MAC saved.
    data:        an iterable of batches (example-input forms) for the data-aware fits (lowrank:
                 SVD whitened by the input second moment; grouped: channel assignment weighted
                 by the inputs, least squares in each block; dilated: least squares on the
                 inputs); each fit's error is then the relative output error on these inputs.
    fold:        grouped: fold each channel shuffle into the neighbouring layers where the
                 dependency graph allows (``torchslim.rewrite.fold``); False keeps every shuffle.
    """

    to: str = "lowrank"
    modules: Sequence[str] = ()
    exclude: Sequence[str] = ()
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    setting: int | None = None
    target_macs: float | None = None
    data: Iterable[Any] | None = None
    fold: bool = True


@dataclasses.dataclass
class RewriteResult:
    """The plan applied, each layer's fit error, and the model's MACs before and after (measured)."""

    plan: RewritePlan
    errors: dict[str, float]
    macs_before: int
    macs_after: int


def model_macs(model: nn.Module, example_inputs: Any) -> int:
    """MACs of ``model`` on ``example_inputs`` (``torchslim.graph.macs`` convention)."""
    return estimate_macs(DependencyGraph.build(model, example_inputs))


def plan_rewrite(model: nn.Module, example_inputs: Any, config: RewriteConfig) -> tuple[RewritePlan, dict[str, torch.Tensor]]:
    """The per-layer plan ``rewrite_`` would apply (and the data moments it fits with); changes nothing."""
    method = _method(config)
    names = select_layers(model, method, config.modules, config.exclude, config.filter_fn)
    positions = output_positions(model, names, example_inputs)
    unused = [n for n in names if not positions[n] and n in config.modules]  # named exactly; globs skip them
    if unused:
        raise ValueError(f"{', '.join(unused)} never ran on the example inputs: cannot cost or rewrite it")
    names = [n for n in names if positions[n]]
    if not names:
        raise ValueError("none of the layers chosen ran on the example inputs")
    moments = input_moments(model, names, config.data) if config.data is not None and method.data_aware else {}
    total = model_macs(model, example_inputs)
    if config.target_macs is not None:
        target = config.target_macs * total if config.target_macs <= 1 else config.target_macs
        return budget_plan(model, method, names, positions, moments, total, int(target)), moments
    return fixed_plan(model, method, names, config.setting if config.setting is not None else 1,
                      positions, moments, total), moments


def _method(config: RewriteConfig):
    if config.to not in METHODS:
        raise ValueError(f"unknown rewrite {config.to!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[config.to]
    if (config.setting is None) == (config.target_macs is None) and method.setting_name != "-":
        raise ValueError(f"give exactly one of setting= (the {method.setting_name}) and target_macs=")
    if config.target_macs is not None and not config.target_macs > 0:
        raise ValueError(f"target_macs must be positive, got {config.target_macs!r}")
    return method


def rewrite_(model: nn.Module, example_inputs: Any, config: RewriteConfig, *,
             plan: RewritePlan | None = None) -> RewriteResult:
    """Rewrite ``model``'s layers in place as ``config`` says (or as a ``plan`` from ``plan_rewrite``)."""
    method = METHODS[config.to] if plan is not None else _method(config)
    moments: dict[str, torch.Tensor] = {}
    if plan is None:
        plan, moments = plan_rewrite(model, example_inputs, config)
    elif config.data is not None and method.data_aware:
        moments = input_moments(model, [p.name for p in plan.layers], config.data)
    fits: dict[str, Fit] = {}
    for row in plan.layers:
        fits[row.name] = METHODS[row.method].fit(model.get_submodule(row.name), row.setting, moments.get(row.name))
        row.fit_error = fits[row.name].error
    for name, fit in fits.items():
        fit.block.train(model.get_submodule(name).training)
    folding = _fold(model, example_inputs, fits, plan) if config.fold else None
    try:
        replace_modules_(model, {name: fit.block for name, fit in fits.items()})  # all or nothing, one plan step
    except Exception:
        if folding is not None:
            folding.undo()
        raise
    return RewriteResult(plan, {n: f.error for n, f in fits.items()}, plan.model_macs, model_macs(model, example_inputs))


def _fold(model: nn.Module, example_inputs: Any, fits: dict[str, Fit], plan: RewritePlan) -> Folding | None:
    """Fold the grouped blocks' shuffles into the model (before they replace its convs) and
    record each side's decision in the plan's rows."""
    blocks = {name: fit.block for name, fit in fits.items() if isinstance(fit.block, GroupedConv2d)}
    if not blocks:
        return None
    folding = fold_shuffles_(model, example_inputs, blocks)
    for row in plan.layers:
        row.folds = dict(folding.sides.get(row.name, {}))
    return folding
