"""Getting accuracy back after pruning: fine-tuning (optionally distilled from the unpruned
model), BatchNorm recalibration and a top-1 accuracy helper.

Batches may come from any re-iterable (a ``DataLoader``, a list) in these forms:

* ``(inputs, targets)`` or ``[inputs, targets]``: ``model(inputs)``; ``inputs`` may itself be
  a tuple of positional inputs or an ``(args, kwargs)`` pair;
* a dict with a ``"labels"`` or ``"targets"`` key: ``model(**rest)`` (Hugging Face style);
* for :func:`recalibrate_bn_` only, a bare tensor or an input dict without targets.

Logits are the model's output, or its ``.logits`` / ``["logits"]`` / first element.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._inputs import call_model
from torchslim.modes import training_mode

__all__ = ["FinetuneResult", "distillation_loss", "evaluate_accuracy", "finetune", "recalibrate_bn_"]

_TARGET_KEYS = ("labels", "label", "targets", "target")


# batches and outputs ------------------------------------------------------------------------
def _to(obj: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _split(batch: Any, need_targets: bool) -> tuple[Any, Any]:
    """``(model inputs, targets or None)`` for one batch."""
    if isinstance(batch, dict):
        key = next((k for k in _TARGET_KEYS if k in batch), None)
        if key is None:
            if need_targets:
                raise ValueError(f"a dict batch needs one of the keys {_TARGET_KEYS} for the targets; got {sorted(batch)}")
            return dict(batch), None
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        if len(batch) == 1 and not need_targets:
            return batch[0], None
        raise ValueError(f"a batch must be (inputs, targets); got a {type(batch).__name__} of length {len(batch)}")
    if isinstance(batch, torch.Tensor) and not need_targets:
        return batch, None
    raise ValueError(f"a batch must be (inputs, targets) or a dict with labels; got {type(batch).__name__}")


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return call_model(model, inputs)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not (console.is_terminal or console.is_jupyter):  # a log file gets no bar (nor blank lines)
        return contextlib.nullcontext(None)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"),
                    console=console, transient=True)


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


# losses ---------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None,
                      *, alpha: float = 0.5, temperature: float = 4.0) -> torch.Tensor:
    """Hinton's knowledge distillation: ``(1 - alpha) * CE(student, targets) + alpha * T^2 *
    KL(softmax(teacher / T) || softmax(student / T))``. With ``targets=None`` only the KD term."""
    t = float(temperature)
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits.detach() / t, dim=-1),
                  reduction="batchmean", log_target=True) * (t * t)
    if targets is None:
        return kd
    ce = F.cross_entropy(student_logits, targets)
    return (1.0 - alpha) * ce + alpha * kd


# fine-tuning ------------------------------------------------------------------------------------
@dataclasses.dataclass
class FinetuneResult:
    """Mean training loss per epoch (the distillation mix when a teacher was given) and step count."""

    epoch_losses: list[float]
    steps: int

    @property
    def final_loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


def finetune(model: nn.Module, loader: Iterable, epochs: int = 1, lr: float = 1e-3, *,
             teacher: nn.Module | None = None, kd_alpha: float = 0.5, temperature: float = 4.0,
             optimizer: torch.optim.Optimizer | None = None, weight_decay: float = 0.0,
             schedule: str | None = None, max_steps: int | None = None, device: torch.device | str | None = None,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` in place with Adam on ``(inputs, targets)`` batches from ``loader``.

    With a ``teacher`` (typically the unpruned model), the loss is
    ``(1 - kd_alpha) * cross-entropy + kd_alpha * T^2 * KL`` on logits softened by
    ``temperature``; the teacher runs in eval mode under ``no_grad`` and is never updated.
    ``kd_alpha=1`` distils only. ``optimizer`` replaces the default Adam(lr, weight_decay).
    ``schedule="cosine"`` decays the learning rate of every parameter group to zero along a
    half cosine over the run (stepped per batch; the loader needs a length, or give
    ``max_steps``); ``None`` keeps it constant.
    ``max_steps`` stops early after that many optimizer steps in total. ``device`` moves the
    model, the teacher and each batch there (``None``: the model stays where it is and the
    teacher and the batches go to the model's device).
    The training flags of every module of ``model`` and ``teacher`` are restored at the end.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if not 0.0 <= kd_alpha <= 1.0:
        raise ValueError(f"kd_alpha must be in [0, 1], got {kd_alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if schedule not in (None, "cosine"):
        raise ValueError(f"schedule must be None or 'cosine', got {schedule!r}")
    if device is not None:
        model.to(device)
    device = _model_device(model)
    if teacher is not None:
        teacher.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    per_epoch = _length(loader)
    total = None if per_epoch is None else per_epoch * epochs
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    scheduler = None
    if schedule == "cosine":
        if total is None:
            raise ValueError("schedule='cosine' needs a loader with a length, or max_steps")
        span = max(1, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, span) / span)))
    losses: list[float] = []
    steps = 0
    teacher_mode = training_mode(teacher, False) if teacher is not None else contextlib.nullcontext()
    with training_mode(model, True), teacher_mode, _progress(progress) as bar:
        task = bar.add_task("fine-tuning", total=total, status="") if bar is not None else None
        for epoch in range(epochs):
            running, count = 0.0, 0
            for batch in loader:
                if max_steps is not None and steps >= max_steps:
                    break
                inputs, targets = _split(_to(batch, device), need_targets=True)
                logits = _logits(_forward(model, inputs))
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = _logits(_forward(teacher, inputs))
                    loss = distillation_loss(logits, teacher_logits, targets, alpha=kd_alpha, temperature=temperature)
                else:
                    loss = F.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                steps += 1
                running += float(loss.detach()) * targets.shape[0]
                count += targets.shape[0]
                if bar is not None:
                    bar.update(task, advance=1, status=f"epoch {epoch + 1}/{epochs} loss {running / count:.4f}")
            if count:
                losses.append(running / count)
            if max_steps is not None and steps >= max_steps:
                break
    return FinetuneResult(losses, steps)


# evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Iterable, *, device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``model`` (in eval mode; training flags restored) over ``loader``.

    ``device=None`` sends batches to wherever the model's parameters are.
    """
    device = _model_device(model) if device is None else torch.device(device)
    correct, total = 0, 0
    with training_mode(model, False):
        for batch in loader:
            inputs, targets = _split(_to(batch, device), need_targets=True)
            pred = _logits(_forward(model, inputs)).argmax(dim=-1)
            correct += int((pred == targets).sum())
            total += int(targets.numel())
    if total == 0:
        raise ValueError("evaluate_accuracy got no batches")
    return correct / total


# BatchNorm recalibration --------------------------------------------------------------------------
def _tracked_norms(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """BatchNorm (any dim, SyncBatchNorm) and instance norms that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, batches: Iterable, num_batches: int | None = None, *,
                    device: torch.device | str | None = None) -> int:
    """Re-estimate the running statistics of every BatchNorm in ``model`` from ``batches``.

    After pruning and fine-tuning, the running mean/var no longer match the weights they
    normalise. This resets them and runs forward passes (no gradients) with the norm layers in
    training mode and ``momentum=None``, so that each running statistic becomes the plain
    average of the per-batch statistics (mean, and unbiased variance) over the batches seen.
    The rest of the model runs in eval mode (dropout off). Momentum values and every module's
    training flag are restored; weights are not touched. Uses the first ``num_batches``
    batches (all if None). Returns the number of batches used; with none, the old statistics
    are put back and ``ValueError`` is raised.
    """
    norms = _tracked_norms(model)
    if not norms:
        return 0
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    device = _model_device(model) if device is None else torch.device(device)
    saved = [(m, m.momentum, _clone(m.running_mean), _clone(m.running_var), _clone(m.num_batches_tracked))
             for m in norms]
    used = 0
    with training_mode(model, False):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        try:
            for batch in batches:
                if num_batches is not None and used >= num_batches:
                    break
                inputs, _ = _split(_to(batch, device), need_targets=False)
                _forward(model, inputs)
                used += 1
        except BaseException:
            _put_back(saved, stats=True)
            raise
        _put_back(saved, stats=used == 0)
    if used == 0:
        raise ValueError("recalibrate_bn_ got no batches; the running statistics were left unchanged")
    return used


def _clone(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.clone()


def _put_back(saved, stats: bool) -> None:
    for m, momentum, mean, var, tracked in saved:
        m.momentum = momentum
        if stats:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
