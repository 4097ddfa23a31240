"""AGP (Zhu & Gupta 2017, "To prune, or not to prune") as a PyTorch Lightning callback.

::

    from torchslim.integrations.lightning import AGPCallback

    agp = AGPCallback(final_sparsity=0.5, start_step=100, total_steps=1000, frequency=100, save_dir="pruned/")
    trainer = lightning.Trainer(max_steps=2000, callbacks=[agp])
    trainer.fit(module, train_loader)      # masks grow on schedule; channels removed at the end
    agp.result.macs_before, agp.result.macs_after

Steps are optimizer steps (``trainer.global_step``), so gradient accumulation counts once per
update. The masks stay enforced after every step of the trainer's optimizer (weights and
state); at ``finalize_step`` or at the end of training :meth:`AGPPruner.finalize
<torchslim.schedules.AGPPruner.finalize>` removes the masked channels physically and slices
that optimizer's state, so training can go on with the same optimizer and LR schedulers.
Needs ``pip install 'torchslim[lightning]'``.
"""
from __future__ import annotations

import os
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as error:  # the optional extra is not installed
    raise ImportError("torchslim.integrations.lightning needs PyTorch Lightning: pip install 'torchslim[lightning]' "
                      "(or pip install 'lightning>=2.2')") from error

from torch import nn

from torchslim.integrations._agp import AGPDriver, AGPSettings, DriverResults, InputsFromBatch
from torchslim.pruning import PruneConfig

__all__ = ["AGPCallback"]


class AGPCallback(pl.Callback, DriverResults):
    """Gradual pruning during ``trainer.fit``: :class:`~torchslim.schedules.AGPPruner` driven by
    the trainer's optimizer steps.

    Schedule and pruning arguments are AGPPruner's: the sparsity rises from ``initial_sparsity``
    to ``final_sparsity`` over ``total_steps`` optimizer steps from ``start_step``, the masks
    growing every ``frequency`` steps; ``config`` (a :class:`~torchslim.PruneConfig`: criterion,
    exclusions, ``round_to``...) or just ``criterion`` says what may go and how it is ranked.

    example_inputs:    the module's forward inputs for the dependency graph; by default the
                       first sample of the first training batch (``inputs_from_batch(batch)``:
                       by default a tensor, ``batch[0]`` of a tuple, a dict without ``labels``).
    submodule:         prune ``pl_module.get_submodule(submodule)`` instead of the LightningModule
                       (the inputs must then be that submodule's).
    finalize_step:     remove the channels physically after this optimizer step (at or after the
                       schedule's end) and train on; ``None``: at the end of training.
    save_dir:          write the pruned model there with :func:`torchslim.save` (global rank 0).
    log_sparsity:      log ``torchslim/sparsity`` every step.

    After fit: ``result`` (a :class:`~torchslim.pruning.PruneResult`, or the masks when
    ``structured=False``), ``history`` (``(step, sparsity)`` after every optimizer step),
    ``pruner``. With several processes (DDP) every rank checks its masks against rank 0's after
    each update; removal happens at the end of training (``finalize_step=None``).
    """

    def __init__(self, *, final_sparsity: float, total_steps: int, initial_sparsity: float = 0.0,
                 start_step: int = 0, frequency: int = 1, structured: bool = True,
                 config: PruneConfig | None = None, criterion: Any = None, keep_dense: bool = False,
                 example_inputs: Any = None, inputs_from_batch: InputsFromBatch | None = None,
                 submodule: str | None = None, finalize_step: int | None = None,
                 save_dir: str | os.PathLike | None = None, log_sparsity: bool = True):
        super().__init__()
        self.driver = AGPDriver(AGPSettings(
            final_sparsity=final_sparsity, total_steps=total_steps, initial_sparsity=initial_sparsity,
            start_step=start_step, frequency=frequency, structured=structured, config=config, criterion=criterion,
            keep_dense=keep_dense, example_inputs=example_inputs, inputs_from_batch=inputs_from_batch,
            finalize_step=finalize_step, save_dir=save_dir, owner="AGPCallback"))
        self.submodule = submodule
        self.log_sparsity = log_sparsity

    # hooks -----------------------------------------------------------------------------------
    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module.get_submodule(self.submodule) if self.submodule else pl_module

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.driver.finalized:  # a later fit of the pruned module: nothing left to schedule
            return
        if len(trainer.optimizers) > 1:
            raise ValueError(f"AGPCallback drives one optimizer; configure_optimizers returned {len(trainer.optimizers)}")
        if self.submodule:
            self._target(pl_module)  # an unknown name fails here, before any step
        max_steps = trainer.max_steps if trainer.max_steps >= 0 else trainer.estimated_stepping_batches
        self.driver.check_run(max_steps, trainer.world_size)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.driver.started and not self.driver.finalized:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.driver.start(self._target(pl_module), optimizer, batch=batch, step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.driver.finalized:
            return
        self.driver.advance(trainer.global_step)
        if self.log_sparsity:
            pl_module.log("torchslim/sparsity", self.driver.sparsity, on_step=True, on_epoch=False, prog_bar=False)
        if self.driver.due(trainer.global_step):
            self._finalize(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finalize(trainer)

    def _finalize(self, trainer: pl.Trainer) -> None:
        if not self.driver.started or self.driver.finalized:
            return
        self.driver.finalize(is_main_process=trainer.is_global_zero)
