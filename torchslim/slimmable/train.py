"""Training one set of weights for every width: the sandwich rule with inplace distillation
(Yu & Huang, ICCV 2019), usable as one step inside the user's own loop, and a small trainer for
the demo and benchmarks.

Per step: the largest width with the user's loss on the labels, then the smallest width and
``n_random`` widths drawn uniformly from the range (US-Nets), or every other configured width
(S-Nets), each trained to the largest width's detached output (inplace distillation);
gradients accumulate over the widths and the caller takes one optimizer step.

With ``layerwise=True`` each random width is drawn per group ({group index: width}), so the
non-uniform configurations that AutoSlim's greedy search visits are trained too, not only the
uniform ones the search starts from (ModelOpt's AutoNAS samples whole random subnets likewise).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from contextlib import nullcontext
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from torchslim.distributed import is_distributed, set_epoch
from torchslim.recovery import distillation_loss
from torchslim.slimmable.slimmable import Slimmable

Loss = Callable[[Any, Any], torch.Tensor]
StepWidth = float | dict[int, float]  # one width for every group, or one per group (layerwise draws)


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Inplace distillation's loss: cross-entropy to the largest width's softened predictions
    (KL divergence at temperature 1; equal to the soft cross-entropy up to a constant)."""
    return distillation_loss(student, teacher, None, temperature=1.0)


def sandwich_widths(slim: Slimmable, n_random: int, rng: random.Random, *,
                    layerwise: bool = False) -> list[StepWidth]:
    """The widths of one step, largest first: with a width range the smallest and ``n_random``
    uniform draws (the sandwich rule; ``layerwise``: one draw per group), else every configured width."""
    config = slim.config
    if config.width_range is None:
        if layerwise:
            raise ValueError("layerwise random widths need a model made slimmable with width_range=(low, high)")
        return [float(w) for w in sorted(config.widths, reverse=True)]
    low, high = config.width_range
    if layerwise:
        draws: list[StepWidth] = [{g.index: rng.uniform(low, high) for g in slim.groups} for _ in range(n_random)]
    else:
        draws = [rng.uniform(low, high) for _ in range(n_random)]
    return [high, low, *draws]


def width_key(width: StepWidth) -> float | tuple[tuple[int, float], ...]:
    """A width as a dictionary key: the number, or a per-group width's sorted (group, width) pairs."""
    return tuple(sorted(width.items())) if isinstance(width, dict) else width


def sandwich_step(slim: Slimmable, inputs: Any, targets: Any, loss_fn: Loss, *, n_random: int = 2,
                  rng: random.Random | None = None, distill: bool = True,
                  distill_fn: Callable[[Any, Any], torch.Tensor] = soft_target_loss,
                  model: nn.Module | None = None, layerwise: bool = False) -> dict[Any, float]:
    """Forward and backward at every width of one sandwich step (see the module docstring);
    returns each width's loss (keyed by :func:`width_key`). Call ``optimizer.zero_grad()`` before
    and ``optimizer.step()`` after. ``distill=False`` trains every width on the labels (S-Nets);
    ``layerwise=True`` draws the random widths per group. The model ends at the width it started at.

    ``model`` is what runs (default ``slim.model``); under torchrun pass
    ``DistributedDataParallel(slim.model)`` (``find_unused_parameters=True`` with switchable
    BatchNorm) and draw the random widths from an ``rng`` seeded alike on every rank: every width
    but the last runs under its ``no_sync``, so the ranks average their gradients once per step."""
    widths = sandwich_widths(slim, n_random, rng or random.Random(0), layerwise=layerwise)
    net = model if model is not None else slim.model
    losses: dict[Any, float] = {}
    before = slim.width
    try:
        teacher = None
        for i, width in enumerate(widths):
            slim.set_width(width)
            local = net.no_sync() if i < len(widths) - 1 and isinstance(net, DistributedDataParallel) else nullcontext()
            with local:
                output = net(*inputs) if isinstance(inputs, tuple) else net(inputs)
                loss = _width_loss(i, output, targets, loss_fn, distill, distill_fn, teacher)
                loss.backward()
            if i == 0 and isinstance(output, torch.Tensor):
                teacher = output.detach()
            losses[width_key(width)] = float(loss.detach())
    finally:
        slim.set_width(before)
    return losses


def _width_loss(i: int, output: Any, targets: Any, loss_fn: Loss, distill: bool,
                distill_fn: Callable[[Any, Any], torch.Tensor], teacher: torch.Tensor | None) -> torch.Tensor:
    """The largest width (first) learns the labels; the others its output, or the labels too."""
    if i == 0 or not distill:
        return loss_fn(output, targets)
    if teacher is None:
        raise TypeError("inplace distillation needs the model to return a tensor; pass distill_fn "
                        "and a model returning a tensor, or distill=False")
    return distill_fn(output, teacher)


def train_sandwich(slim: Slimmable, loader: Iterable, epochs: int, *, lr: float = 0.05, momentum: float = 0.9,
                   weight_decay: float = 1e-4, n_random: int = 2, seed: int = 0, distill: bool = True,
                   distill_warmup: int = 0, loss_fn: Loss = F.cross_entropy, layerwise: bool = False) -> list[float]:
    """A ready sandwich-rule trainer (SGD with momentum, cosine learning rate) over ``loader``
    of ``(input, target)`` batches; returns the mean largest-width loss per epoch (this rank's
    batches); ``layerwise`` as in :func:`sandwich_step`. Under torchrun it trains through
    DistributedDataParallel (see :func:`sandwich_step`) on this rank's shard of the data.

    ``distill_warmup``: the first epochs train every width on the labels, and inplace
    distillation starts after them: early in a short training the largest width is a poor
    teacher, and distilling from it holds the narrow widths back."""
    if not 0 <= distill_warmup <= epochs:
        raise ValueError(f"distill_warmup must be a number of epochs in [0, epochs={epochs}], got {distill_warmup}")
    optimizer = torch.optim.SGD(slim.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    net = (DistributedDataParallel(slim.model, find_unused_parameters=slim.config.switchable_bn)
           if is_distributed() else None)
    steps = max(1, epochs * _length(loader))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    rng = random.Random(seed)
    slim.train()
    history = []
    for epoch in range(epochs):
        set_epoch(loader, epoch)
        total, count = 0.0, 0
        for inputs, targets in loader:
            optimizer.zero_grad()
            losses = sandwich_step(slim, inputs, targets, loss_fn, n_random=n_random, rng=rng,
                                   distill=distill and epoch >= distill_warmup, model=net, layerwise=layerwise)
            optimizer.step()
            schedule.step()
            total, count = total + next(iter(losses.values())), count + 1
        history.append(total / max(1, count))
    slim.eval()
    return history


def _length(loader: Iterable) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 1
