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
import os
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.distributed import (all_reduce_arrays, all_reduce_tensors_, is_distributed, is_sharded, is_wrapped,
                                   set_epoch, unwrap)
from torchslim._inputs import call_model
from torchslim.modes import training_mode
from torchslim.recovery._resume import RunPosition, load_state, save_state

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
             progress: bool = True, accumulate: int = 1, precision: str | None = None, freeze_bn: bool = False,
             checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
             resume: bool = False) -> FinetuneResult:
    """Fine-tune ``model`` in place with Adam on ``(inputs, targets)`` batches from ``loader``.

    With a ``teacher`` (typically the unpruned model), the loss is
    ``(1 - kd_alpha) * cross-entropy + kd_alpha * T^2 * KL`` on logits softened by
    ``temperature``; the teacher runs in eval mode under ``no_grad`` and is never updated.
    ``kd_alpha=1`` distils only. ``optimizer`` replaces the default Adam(lr, weight_decay).
    ``schedule="cosine"`` decays the learning rate of every parameter group to zero along a
    half cosine over the run (stepped per optimizer step; the loader needs a length, or give
    ``max_steps``); ``None`` keeps it constant.
    ``max_steps`` stops early after that many optimizer steps in total. ``device`` moves the
    model, the teacher and each batch there (``None``: the model stays where it is and the
    teacher and the batches go to the model's device).

    ``accumulate`` batches make one optimizer step (each batch's loss divided by it; an epoch's
    last batches step with what they have). ``precision="bf16"`` runs the forward passes under
    autocast in bfloat16 (CPU and GPU); ``"fp16"`` in float16 with a gradient scaler (GPU only).
    ``freeze_bn`` keeps BatchNorm layers in eval mode (running statistics used and kept; their
    affine weights still train), as is common when fine-tuning small batches.

    Under torchrun (a process group of several ranks) the model trains through
    ``DistributedDataParallel`` (wrapped here unless it already is): gradients are averaged over
    the ranks, so N ranks on N shards of a global batch step like one process on all of it
    (``loader`` gives this rank's shard, e.g. a ``DataLoader`` with a ``DistributedSampler``, whose
    ``set_epoch`` is called each epoch). BatchNorm batch statistics stay per rank (PyTorch's
    ``SyncBatchNorm`` needs a GPU; ``freeze_bn`` sidesteps them). ``checkpoint_dir`` with
    ``checkpoint_every`` writes the run's state every that many optimizer steps (rank 0, one
    file replaced atomically); ``resume=True`` continues from it when it exists (the same call
    after a crash or a kill), else starts afresh. The training flags of every module of
    ``model`` and ``teacher`` are restored at the end.
    """
    _check_finetune_args(epochs, kd_alpha, temperature, schedule, accumulate, precision, checkpoint_dir,
                         checkpoint_every, resume)
    if device is not None:
        unwrap(model).to(device)
    device = _model_device(model)
    if teacher is not None:
        teacher.to(device)
    inner = unwrap(model)
    params = [p for p in inner.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise ValueError("the model has no trainable parameters")
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    total = _total_steps(loader, epochs, accumulate, max_steps)
    scheduler = None
    if schedule == "cosine":
        if total is None:
            raise ValueError("schedule='cosine' needs a loader with a length, or max_steps")
        span = max(1, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, span) / span)))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    extras = {"scheduler": scheduler, "scaler": scaler}
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    position = (load_state(directory, inner, optimizer, extras) if resume and directory is not None else None) or RunPosition()
    net = _distributed_wrapper(model, device)
    teacher_mode = training_mode(teacher, False) if teacher is not None else contextlib.nullcontext()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision else contextlib.nullcontext())
    step_fn = _OptimizerStep(optimizer, scheduler, scaler)
    with training_mode(inner, True), teacher_mode, _frozen_bn(inner, freeze_bn), _progress(progress) as bar:
        task = bar.add_task("fine-tuning", total=total, completed=position.step, status="") if bar is not None else None
        while position.epoch < epochs and not (max_steps is not None and position.step >= max_steps):
            for batch, last in _epoch_batches(loader, position):
                if max_steps is not None and position.step >= max_steps:
                    break
                position.batch_in_epoch += 1
                sync = last or position.batch_in_epoch % accumulate == 0
                with _gradients_kept_local(net, keep=not sync):
                    with autocast:
                        loss, size = _batch_loss(net, teacher, batch, device, kd_alpha, temperature)
                    step_fn.backward(loss / accumulate)
                position.running += float(loss.detach()) * size
                position.count += size
                if not sync:
                    continue
                step_fn()
                position.step += 1
                if checkpoint_every is not None and directory is not None and position.step % checkpoint_every == 0:
                    save_state(directory, position, inner, optimizer, extras)
                if bar is not None:
                    bar.update(task, advance=1, status=f"epoch {position.epoch + 1}/{epochs} "
                                                       f"loss {position.running / max(1, position.count):.4f}")
            else:
                _end_epoch(position)
                continue
            _end_epoch(position)  # max_steps reached inside the epoch: its loss so far
            break
    del net
    return FinetuneResult(position.losses, position.step)


def _check_finetune_args(epochs, kd_alpha, temperature, schedule, accumulate, precision, checkpoint_dir,
                         checkpoint_every, resume) -> None:
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if not 0.0 <= kd_alpha <= 1.0:
        raise ValueError(f"kd_alpha must be in [0, 1], got {kd_alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if schedule not in (None, "cosine"):
        raise ValueError(f"schedule must be None or 'cosine', got {schedule!r}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive number of batches per step, got {accumulate!r}")
    if precision not in (None, "bf16", "fp16"):
        raise ValueError(f"precision must be None, 'bf16' or 'fp16', got {precision!r}")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                         or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
    if (checkpoint_every is not None or resume) and checkpoint_dir is None:
        raise ValueError("checkpoint_every and resume need checkpoint_dir= (where the run's state is kept)")


def _total_steps(loader: Any, epochs: int, accumulate: int, max_steps: int | None) -> int | None:
    per_epoch = _length(loader)
    total = None if per_epoch is None else math.ceil(per_epoch / accumulate) * epochs
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    return total


def _distributed_wrapper(model: nn.Module, device: torch.device) -> nn.Module:
    """The module that trains: ``model`` itself (one process, already wrapped, or sharded by FSDP2,
    which reduces gradients itself), or under torchrun a DDP wrapper of it."""
    if not is_distributed() or is_wrapped(model) or is_sharded(model):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _gradients_kept_local(net: nn.Module, keep: bool):
    """DDP's ``no_sync`` inside an accumulation (gradients are averaged at its last batch only)."""
    if keep and isinstance(net, nn.parallel.DistributedDataParallel):
        return net.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _frozen_bn(model: nn.Module, freeze: bool):
    if not freeze:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    yield


def _epoch_batches(loader: Iterable, position: RunPosition):
    """This epoch's batches with a flag for the last one; a resumed epoch redraws its order from
    the saved random state and skips the batches already trained on."""
    set_epoch(loader, position.epoch)
    if position.resumed_rng is not None and position.epoch_rng is not None:
        torch.set_rng_state(position.epoch_rng)
    else:
        position.epoch_rng = torch.get_rng_state()
    batches = iter(loader)
    for _ in range(position.batch_in_epoch):
        next(batches, None)
    if position.resumed_rng is not None:
        torch.set_rng_state(position.resumed_rng)
        position.resumed_rng = None
    upcoming = next(batches, _END)
    while upcoming is not _END:
        batch, upcoming = upcoming, next(batches, _END)
        yield batch, upcoming is _END


_END = object()


def _end_epoch(position: RunPosition) -> None:
    """The epoch's mean loss (over every rank's samples) and the position at the next epoch."""
    summed = all_reduce_arrays({"running": position.running, "count": position.count})
    if summed["count"]:
        position.losses.append(summed["running"] / summed["count"])
    position.epoch += 1
    position.batch_in_epoch, position.running, position.count = 0, 0.0, 0
    position.epoch_rng = None


def _batch_loss(net: nn.Module, teacher: nn.Module | None, batch: Any, device: torch.device, kd_alpha: float,
                temperature: float) -> tuple[torch.Tensor, int]:
    inputs, targets = _split(_to(batch, device), need_targets=True)
    logits = _logits(_forward(net, inputs))
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = _logits(_forward(teacher, inputs))
        loss = distillation_loss(logits.float(), teacher_logits.float(), targets, alpha=kd_alpha,
                                 temperature=temperature)
    else:
        loss = F.cross_entropy(logits.float(), targets)
    return loss, int(targets.shape[0])


class _OptimizerStep:
    """Backward and step, through the gradient scaler when float16 needs one."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def __call__(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


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
    used = _average_over_ranks(norms, used)
    if used == 0:
        raise ValueError("recalibrate_bn_ got no batches; the running statistics were left unchanged")
    return used


def _average_over_ranks(norms: list[nn.modules.batchnorm._NormBase], used: int) -> int:
    """Under torchrun: each running statistic becomes the average over every rank's batches (each
    rank's average weighted by its batch count), as one process over all of them would compute;
    returns the batches used on all ranks together."""
    if not is_distributed():
        return used
    stats = [t for m in norms for t in (m.running_mean, m.running_var) if t is not None]
    total = all_reduce_arrays({"batches": used})["batches"]
    if total == 0:
        return 0
    for tensor in stats:
        tensor.mul_(used / total)
    all_reduce_tensors_(stats)
    return int(total)


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
