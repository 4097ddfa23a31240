"""Prune a little, fine-tune, repeat (iterative pruning as in Han et al. 2015, "Learning both
Weights and Connections", and Li et al. 2017's prune-and-retrain): ``prune_iteratively``."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.pruning import PruneConfig, PruneResult, PruningPlan, prune_

FinetuneCallback = Callable[[nn.Module, int], None]


@dataclasses.dataclass
class IterativeResult:
    steps: list[PruneResult]
    plan: PruningPlan

    @property
    def macs_before(self) -> int:
        return self.steps[0].macs_before

    @property
    def macs_after(self) -> int:
        return self.steps[-1].macs_after


def step_configs(config: PruneConfig, steps: int, macs_before: int | None = None) -> list[PruneConfig]:
    """Per-step configs whose cumulative effect is ``config``: MACs targets fall linearly
    (as absolute MACs of the original), ratios compound so each step removes the same share."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if config.target_macs is not None:
        if macs_before is None:
            raise ValueError("step_configs: a MACs target needs macs_before, the original model's MACs")
        total = config.target_macs * macs_before if config.target_macs <= 1 else config.target_macs
        start = macs_before
        return [dataclasses.replace(config, target_macs=float(start - (start - total) * (i + 1) / steps))
                for i in range(steps)]
    per_step = 1.0 - (1.0 - config.ratio) ** (1.0 / steps)
    return [dataclasses.replace(config, ratio=per_step) for _ in range(steps)]


def prune_iteratively(model: nn.Module, example_inputs: ExampleInputs, config: PruneConfig, *, steps: int = 4,
                      finetune: FinetuneCallback | None = None, data: Any = None, loss_fn: Any = None,
                      optimizer: torch.optim.Optimizer | None = None) -> IterativeResult:
    """``steps`` rounds of ``prune_`` toward ``config``'s ratio or MACs target, calling
    ``finetune(model, step)`` after each round (fine-tune, recalibrate BN...). An ``optimizer``
    the fine-tuning keeps using has its per-parameter state sliced at every round."""
    from torchslim.graph import DependencyGraph
    from torchslim.graph.macs import estimate_macs

    macs_before = estimate_macs(DependencyGraph.build(model, example_inputs)) if config.target_macs is not None else None
    results: list[PruneResult] = []
    plan = PruningPlan()
    for i, step_config in enumerate(step_configs(config, steps, macs_before)):
        result = prune_(model, example_inputs, step_config, data=data, loss_fn=loss_fn, optimizer=optimizer)
        results.append(result)
        plan = plan.extend(result.plan)
        if finetune is not None:
            finetune(model, i)
    return IterativeResult(results, plan)
