"""AGP (Zhu & Gupta 2017, "To prune, or not to prune") as a Hugging Face ``transformers.TrainerCallback``.

::

    from torchslim.integrations.hf_trainer import AGPTrainerCallback

    agp = AGPTrainerCallback(final_sparsity=0.5, start_step=100, total_steps=1000, frequency=100,
                             save_dir="pruned/")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=[agp])
    trainer.train()                        # masks grow on schedule; heads and FFN units removed at the end
    agp.result.macs_before, agp.result.macs_after

Steps are the Trainer's optimizer steps (``state.global_step``; gradient accumulation counts
once per update). The masks stay enforced after every step of ``trainer.optimizer`` (the
``torch.optim`` optimizer under accelerate's wrapper; weights and state); at ``finalize_step``
or at the end of training :meth:`AGPPruner.finalize <torchslim.schedules.AGPPruner.finalize>`
removes the masked units physically and slices that optimizer's state, so training goes on with
the same optimizer and LR scheduler. Needs ``pip install 'torchslim[hf]'``.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:  # the optional extra is not installed
    raise ImportError("torchslim.integrations.hf_trainer needs transformers and accelerate: "
                      "pip install 'torchslim[hf]'") from error
if importlib.util.find_spec("accelerate") is None:
    raise ImportError("torchslim.integrations.hf_trainer needs accelerate (transformers' Trainer runs on it): "
                      "pip install 'torchslim[hf]'")

import torch
from torch import nn

from torchslim.integrations._agp import AGPDriver, AGPSettings, DriverResults, InputsFromBatch, model_device, to_device, unwrap_model
from torchslim.pruning import PruneConfig

__all__ = ["AGPTrainerCallback"]


class AGPTrainerCallback(TrainerCallback, DriverResults):
    """Gradual pruning during ``Trainer.train``: :class:`~torchslim.schedules.AGPPruner` driven by
    the Trainer's optimizer steps.

    Schedule and pruning arguments are AGPPruner's: the sparsity rises from ``initial_sparsity``
    to ``final_sparsity`` over ``total_steps`` optimizer steps from ``start_step``, the masks
    growing every ``frequency`` steps; ``config`` (a :class:`~torchslim.PruneConfig`: criterion,
    exclusions, ``round_to``...) or just ``criterion`` says what may go and how it is ranked.

    example_inputs:    the model's forward inputs (e.g. ``{"input_ids": ..., "attention_mask": ...}``)
                       for the dependency graph; by default the data collator applied to the
                       first training example, without its ``labels`` (``inputs_from_batch``
                       chooses otherwise). An iterable dataset needs ``example_inputs``.
    finalize_step:     remove the units physically after this optimizer step (at or after the
                       schedule's end) and train on; ``None``: at the end of training.
    save_dir:          write the pruned model there with :func:`torchslim.save` (world process zero).

    The current sparsity is added to the Trainer's logs (``sparsity``: ``state.log_history`` and
    the callbacks listed after this one). After training:
    ``result`` (a :class:`~torchslim.pruning.PruneResult`, or the masks when
    ``structured=False``), ``history`` (``(step, sparsity)`` after every optimizer step),
    ``pruner``. Under ``torchrun`` every rank checks its masks against rank 0's after each
    update; removal happens at the end of training (``finalize_step=None``).
    """

    def __init__(self, *, final_sparsity: float, total_steps: int, initial_sparsity: float = 0.0,
                 start_step: int = 0, frequency: int = 1, structured: bool = True,
                 config: PruneConfig | None = None, criterion: Any = None, keep_dense: bool = False,
                 example_inputs: Any = None, inputs_from_batch: InputsFromBatch | None = None,
                 finalize_step: int | None = None, save_dir: str | os.PathLike | None = None):
        self.driver = AGPDriver(AGPSettings(
            final_sparsity=final_sparsity, total_steps=total_steps, initial_sparsity=initial_sparsity,
            start_step=start_step, frequency=frequency, structured=structured, config=config, criterion=criterion,
            keep_dense=keep_dense, example_inputs=example_inputs, inputs_from_batch=inputs_from_batch,
            finalize_step=finalize_step, save_dir=save_dir, owner="AGPTrainerCallback"))

    # hooks -----------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise ValueError("AGPTrainerCallback: the Trainer passed no model to on_train_begin")
        if self.driver.started or self.driver.finalized:
            return
        self.driver.check_run(state.max_steps if state.max_steps > 0 else None, max(args.world_size, 1))
        model = unwrap_model(model)
        batch = None
        if self.driver.settings.example_inputs is None and self.driver.settings.structured:
            batch = _first_batch(train_dataloader, model_device(model))
        self.driver.start(model, optimizer, batch=batch, step=state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.driver.finalized:
            return
        self.driver.advance(state.global_step)
        if self.driver.due(state.global_step):
            self.driver.finalize(is_main_process=state.is_world_process_zero)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or not self.driver.started:
            return
        sparsity = self.driver.settings.final_sparsity if self.driver.finalized else self.driver.sparsity
        logs["sparsity"] = sparsity  # for the callbacks after this one
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sparsity"] = sparsity  # the Trainer copied logs there already

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.driver.finalize(is_main_process=state.is_world_process_zero)


def _first_batch(loader: Any, device: torch.device) -> Any:
    """The collator applied to the first example of the training set, on ``device``: a batch
    of one, built without iterating the loader (which would move its sampler and RNG)."""
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ValueError("AGPTrainerCallback: cannot take example inputs from an iterable training set; pass "
                         "example_inputs= (the model's forward inputs, e.g. a dict with input_ids)")
    batch = collate([dataset[0]]) if collate is not None else dataset[0]
    return to_device(batch, device)
