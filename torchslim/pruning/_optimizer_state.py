"""Optimizers across a pruning: slice their per-parameter state, refuse to step on stale state.

Pruning keeps the parameter objects (their data is sliced in place), so an optimizer built
before ``prune_`` or ``load`` keeps updating the model. Its per-parameter state (Adam's
``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``: every state tensor shaped like the
parameter) is sliced to the kept indices by :func:`slice_optimizer_state` when the optimizer
is passed to ``prune_(..., optimizer=)``. Otherwise that state keeps the old shape; a global
optimizer pre-step hook then raises :class:`StaleOptimizerStateError` naming the parameter,
instead of torch's shape error from inside the update.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from torchslim.pruning._surgery import _index_kept, named_tensors
from torchslim.pruning.plan import PruningPlan


class StaleOptimizerStateError(RuntimeError):
    """An optimizer holds state shaped for a parameter as it was before pruning."""


# parameter -> (its name in the pruned model, the shapes it had before each pruning)
_FORMER_SHAPES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_hook_handle: Any = None


def check_optimizer(optimizer: Any) -> None:
    """Refuse anything that is not a ``torch.optim.Optimizer`` before the model is touched."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


@torch.no_grad()
def slice_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, plan: PruningPlan) -> None:
    """Slice ``optimizer``'s state of every parameter ``plan`` pruned (``model`` is already pruned).

    A state tensor is sliced when its shape is the parameter's shape before the step (moments,
    momentum buffers); anything else (the scalar ``step``) is left as it is. Every new value is
    computed before any is set, so a failure leaves the optimizer as it was.
    """
    tensors = named_tensors(model)
    for step in plan.steps:
        updates = []
        for name, dims in step.removed.items():
            state = optimizer.state.get(tensors[name]) if name in tensors else None
            if not state:
                continue
            kept = {dim: step.kept(name, dim) for dim in sorted(dims)}
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and list(value.shape) == list(step.shapes[name]):
                    updates.append((state, key, _index_kept(value, kept)))
        for state, key, value in updates:
            state[key] = value


def remember_former_shapes(model: nn.Module, plan: PruningPlan) -> None:
    """Note the shapes ``plan`` took the model's parameters from, so that a step on state still
    shaped like that raises :class:`StaleOptimizerStateError` instead of a bare shape error."""
    tensors = named_tensors(model)
    for i, step in enumerate(plan.steps):
        for name in step.removed:
            param = tensors.get(plan.name_at_end(name, i) or "")
            if isinstance(param, nn.Parameter):
                _, shapes = _FORMER_SHAPES.get(param, (name, set()))
                _FORMER_SHAPES[param] = (name, shapes | {tuple(step.shapes[name])})
    _install_hook()


def _install_hook() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_refuse_stale_state)


def _refuse_stale_state(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global pre-step hook: raise when a pruned parameter's state still has a former shape."""
    if not _FORMER_SHAPES:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            former = _FORMER_SHAPES.get(param)
            state = optimizer.state.get(param) if former is not None else None
            if not state:
                continue
            name, shapes = former
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape != param.shape and tuple(value.shape) in shapes:
                    raise StaleOptimizerStateError(
                        f"{type(optimizer).__name__} state '{key}' of parameter '{name}' has shape "
                        f"{list(value.shape)} from before pruning; the parameter is now {list(param.shape)}. "
                        "Pass the optimizer to torchslim.prune_(..., optimizer=opt) to slice its state, "
                        "or build the optimizer after pruning")
