"""What the Lightning and Hugging Face callbacks share: the schedule checks, the
:class:`~torchslim.schedules.AGPPruner` they drive, the optimizer-step count, the mask check
across ranks, the physical removal and the checkpoint.

Neither framework is imported here; each callback module translates its framework's hooks into
:meth:`AGPDriver.start`, :meth:`AGPDriver.advance` and :meth:`AGPDriver.finalize`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import torch
from torch import nn

from torchslim.criteria import make_importance
from torchslim.distributed import barrier, world_size
from torchslim.integrations._distributed import sync_masks_
from torchslim.pruning import PruneConfig, PruneResult
from torchslim.schedules import AGPPruner
from torchslim.sparsity.masks import WeightMasks

log = logging.getLogger("torchslim")

#: batch keys that hold targets, not model inputs (Hugging Face collators, torchslim.recovery)
LABEL_KEYS = ("labels", "label", "label_ids", "targets", "target")

InputsFromBatch = Callable[[Any], Any]


def default_inputs_from_batch(batch: Any) -> Any:
    """The model's inputs in a training batch: a tensor as is, the first item of an
    ``(inputs, targets)`` tuple or list, a dict without its label keys (``labels``, ...)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        return {k: batch[k] for k in batch.keys() if k not in LABEL_KEYS}
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"cannot find the model inputs in a batch of type {type(batch).__name__}; "
                    "pass example_inputs= or inputs_from_batch=")


def first_sample(inputs: Any) -> Any:
    """``inputs`` with every tensor cut to its first row (batch of one), detached and copied so
    no data-loader buffer is kept alive."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1].detach().clone() if inputs.dim() > 0 else inputs.detach().clone()
    if isinstance(inputs, dict):
        return {k: first_sample(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(first_sample(v) for v in inputs)
    return inputs


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor in ``obj`` (nested dicts, mappings, tuples, lists) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "__getitem__")):
        return {k: to_device(obj[k], device) for k in obj.keys()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim.Optimizer`` under wrappers such as accelerate's ``AcceleratedOptimizer``
    or Lightning's ``LightningOptimizer`` (each keeps the real one as ``.optimizer``)."""
    seen = 0
    while optimizer is not None and not _is_plain(optimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    if optimizer is None or not isinstance(optimizer, torch.optim.Optimizer):
        return None
    return optimizer


def _is_plain(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optimizer", None)
    return isinstance(optimizer, torch.optim.Optimizer) and not isinstance(inner, torch.optim.Optimizer)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@dataclasses.dataclass
class AGPSettings:
    """The callbacks' arguments, checked once when the callback is built."""

    final_sparsity: float
    total_steps: int
    initial_sparsity: float = 0.0
    start_step: int = 0
    frequency: int = 1
    structured: bool = True
    config: PruneConfig | None = None
    criterion: Any = None
    keep_dense: bool = False
    example_inputs: Any = None
    inputs_from_batch: InputsFromBatch | None = None
    finalize_step: int | None = None
    save_dir: str | os.PathLike | None = None
    owner: str = "AGP callback"

    def __post_init__(self) -> None:
        name = self.owner
        if not 0 <= self.initial_sparsity <= self.final_sparsity < 1:
            raise ValueError(f"{name}: need 0 <= initial_sparsity <= final_sparsity < 1, got initial_sparsity="
                             f"{self.initial_sparsity}, final_sparsity={self.final_sparsity}")
        for field, low in (("total_steps", 1), ("start_step", 0), ("frequency", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: {field} must be an integer >= {low}, got {value!r}")
        if self.config is not None and not isinstance(self.config, PruneConfig):
            raise TypeError(f"{name}: config must be a torchslim.PruneConfig, got {type(self.config).__name__}")
        config = self.config or PruneConfig(ratio=self.final_sparsity)
        if self.criterion is not None:
            config = dataclasses.replace(config, criterion=self.criterion)  # PruneConfig checks the name
        if config.target is not None:
            raise ValueError(f"{name}: AGP prunes every group to the scheduled sparsity; the config's "
                             f"{config.target.field}={config.target.value} would be ignored. Use final_sparsity, or "
                             "torchslim.prune_iteratively / prune_ for a MACs, params or latency target")
        if self.structured:
            importance = make_importance(config.criterion, config.seed)
            if hasattr(importance, "prepare"):
                raise ValueError(f"{name}: criterion {config.criterion!r} measures the model on data batches, which "
                                 "AGP's weight-based schedule does not give it; use l1, l2, fpgm, lamp, bn_scale or random")
        self.config = config
        end = self.start_step + self.total_steps
        if self.finalize_step is not None and (isinstance(self.finalize_step, bool) or not isinstance(self.finalize_step, int)
                                               or self.finalize_step < end):
            raise ValueError(f"{name}: finalize_step={self.finalize_step!r} must be an integer at or after the schedule's "
                             f"end, start_step + total_steps = {end} (or None: at the end of training)")
        if self.example_inputs is None and self.inputs_from_batch is not None and not callable(self.inputs_from_batch):
            raise TypeError(f"{name}: inputs_from_batch must be a callable batch -> model inputs")

    @property
    def end_step(self) -> int:
        """The optimizer step at which the schedule reaches ``final_sparsity``."""
        return self.start_step + self.total_steps


class AGPDriver:
    """One AGP run inside a framework's training loop, counted in optimizer steps.

    ``history`` holds ``(optimizer step, sparsity)`` after every step the driver saw; ``result``
    is what :meth:`AGPPruner.finalize` returned (a ``PruneResult`` when structured).
    """

    def __init__(self, settings: AGPSettings):
        self.settings = settings
        self.pruner: AGPPruner | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[tuple[int, float]] = []
        self.result: PruneResult | WeightMasks | None = None
        self.masks_differed = 0  # mask updates at which a rank disagreed with rank 0 (and was overruled)

    # -- checks before the first step ------------------------------------------------------
    def check_run(self, max_steps: int | float | None, ranks: int) -> None:
        """Refuse a schedule the run cannot complete, before any step (``max_steps``: the
        optimizer steps the run will take, None or inf when unknown)."""
        s, name = self.settings, self.settings.owner
        last = int(max_steps) if max_steps is not None and 0 <= max_steps < float("inf") else None
        if last is not None and s.end_step > last:
            raise ValueError(f"{name}: the AGP schedule ends at optimizer step {s.end_step} (start_step {s.start_step} + "
                             f"total_steps {s.total_steps}) but training stops after {last} steps; "
                             "shorten the schedule or train longer")
        if last is not None and s.finalize_step is not None and s.finalize_step > last:
            raise ValueError(f"{name}: finalize_step={s.finalize_step} is after the last optimizer step "
                             f"({last}); use finalize_step=None to remove the channels at the end")
        if ranks > 1 and s.structured and s.finalize_step is not None and not (last is not None and s.finalize_step >= last):
            raise ValueError(f"{name}: removing channels while training goes on (finalize_step={s.finalize_step}) is not "
                             f"supported with {ranks} processes: DistributedDataParallel's buckets are built for the "
                             "unpruned shapes. Use finalize_step=None (removal at the end), then start a new fit")

    # -- the run -------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.pruner is not None

    @property
    def finalized(self) -> bool:
        return self.result is not None

    @property
    def sparsity(self) -> float:
        return self.pruner.current if self.pruner is not None else 0.0

    def start(self, model: nn.Module, optimizer: Any, *, batch: Any = None, step: int = 0) -> AGPPruner:
        """Build the pruner on ``model`` (example inputs given, or cut from ``batch``); the
        optimizer's steps re-apply the masks from now on. ``step``: optimizer steps already taken
        (a resumed run), at which the schedule is caught up from the (masked) weights."""
        s = self.settings
        inputs = s.example_inputs
        if inputs is None and s.structured:
            if batch is None:
                raise ValueError(f"{s.owner}: structured AGP needs example inputs: pass example_inputs= "
                                 "(the model's forward inputs) or let the callback take them from the first batch")
            inputs = first_sample((s.inputs_from_batch or default_inputs_from_batch)(batch))
        inputs = to_device(inputs, model_device(model))
        self.optimizer = unwrap_optimizer(optimizer)
        if optimizer is not None and self.optimizer is None:
            raise TypeError(f"{s.owner}: cannot find a torch.optim.Optimizer in {type(optimizer).__name__}")
        self.pruner = AGPPruner(model, inputs, final_sparsity=s.final_sparsity, total_steps=s.total_steps,
                                initial_sparsity=s.initial_sparsity, start_step=s.start_step, frequency=s.frequency,
                                structured=s.structured, config=s.config, optimizer=self.optimizer,
                                keep_dense=s.keep_dense)
        if step > 0:  # resumed: the masks of the last update at or before `step`, from the checkpoint's weights
            last = step if step < s.start_step else s.start_step + (step - s.start_step) // s.frequency * s.frequency
            if last >= s.start_step:
                self.pruner.t = last - 1
                self._step()
            self.pruner.t = step
            log.info("%s: resumed at optimizer step %d with sparsity %.3f", s.owner, step, self.pruner.current)
        return self.pruner

    def advance(self, global_step: int) -> bool:
        """Step the pruner up to ``global_step`` optimizer steps; True when the masks grew."""
        if self.pruner is None or self.finalized:
            return False
        grew = False
        while self.pruner.t < global_step:
            before = self.pruner.current
            self._step()
            grew = grew or self.pruner.current > before
            self.history.append((self.pruner.t, self.pruner.current))
        return grew

    def _step(self) -> None:
        assert self.pruner is not None
        before = self.pruner.current
        self.pruner.step()
        if self.pruner.current > before and sync_masks_(self.pruner, self.optimizer):
            self.masks_differed += 1
            log.warning("%s: at step %d the masks on this rank differed from rank 0's; rank 0's were taken",
                        self.settings.owner, self.pruner.t)

    def due(self, global_step: int) -> bool:
        """Is ``global_step`` the chosen step for the physical removal?"""
        return self.settings.finalize_step is not None and not self.finalized and global_step >= self.settings.finalize_step

    def finalize(self, *, is_main_process: bool = True) -> PruneResult | WeightMasks | None:
        """Remove the masked channels (structured) via ``AGPPruner.finalize``, slicing the
        optimizer's state; save to ``save_dir`` from the main process. Once."""
        if self.pruner is None or self.finalized:
            return self.result
        self.result = self.pruner.finalize()
        s = self.settings
        log.info("%s: finalized at step %d (sparsity %.3f)", s.owner, self.pruner.t, s.final_sparsity)
        if s.save_dir is not None:
            if is_main_process:
                from torchslim.io import save

                save(self.pruner.model, s.save_dir, metadata={"agp": {
                    "final_sparsity": s.final_sparsity, "total_steps": s.total_steps, "start_step": s.start_step,
                    "frequency": s.frequency, "finalized_at_step": self.pruner.t}})
            barrier()
        return self.result


__all__ = ["AGPDriver", "AGPSettings", "default_inputs_from_batch", "first_sample", "model_device", "to_device",
           "unwrap_model", "unwrap_optimizer", "world_size"]


class DriverResults:
    """What a callback exposes of its :class:`AGPDriver` once training ran: the pruner, the
    result of the removal (or the masks) and the ``(step, sparsity)`` history."""

    driver: AGPDriver

    @property
    def pruner(self) -> AGPPruner | None:
        return self.driver.pruner

    @property
    def result(self) -> PruneResult | WeightMasks | None:
        return self.driver.result

    @property
    def history(self) -> list[tuple[int, float]]:
        return self.driver.history
