"""Checkpoints of a fine-tuning run that a killed job resumes from, one process or many.

One file, ``finetune_state.pt`` in the run's directory, replaced atomically every N optimizer
steps by rank 0: the model's and optimizer's (and scheduler's, gradient scaler's) state, the
position in the run (step, epoch, batches into the epoch) and every rank's running loss and
random state, both at the start of the epoch (so the epoch's data order is drawn
again) and now. It is read with ``torch.load(weights_only=True)``: tensors, numbers, strings
and containers only, never code. Under torchrun the directory must be one every rank sees.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.distributed import barrier, gather_objects, is_sharded, rank, world_size

STATE_FILE = "finetune_state.pt"
FORMAT = "torchslim.finetune/1"


@dataclasses.dataclass
class RunPosition:
    """Where a fine-tuning run is: optimizer steps done, the epoch, batches consumed in it (the
    micro-batches of an incomplete accumulation are not: they are redone), the epoch's running
    loss sum and sample count, the per-epoch mean losses so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    running: float = 0.0
    count: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    epoch_rng: torch.Tensor | None = None  # this rank's CPU random state when the epoch began
    resumed_rng: torch.Tensor | None = None  # this rank's random state at the checkpoint (resume only)


def save_state(directory: Path, position: RunPosition, model: nn.Module, optimizer: torch.optim.Optimizer,
               extras: dict[str, Any]) -> None:
    """Write the run's state (rank 0; every rank's random states gathered first); all ranks
    wait until the file is in place."""
    local = gather_objects((position.epoch_rng, torch.get_rng_state(), position.running, position.count))
    model_state, optimizer_state = _full_states(model, optimizer)
    if rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        state = {"format": FORMAT, "world_size": world_size(), "step": position.step, "epoch": position.epoch,
                 "batch_in_epoch": position.batch_in_epoch, "running": [r[2] for r in local],
                 "count": [r[3] for r in local], "losses": list(position.losses), "epoch_rng": [r[0] for r in local],
                 "rng": [r[1] for r in local], "model": model_state, "optimizer": optimizer_state,
                 **{k: v.state_dict() for k, v in extras.items() if v is not None}}
        fd, tmp = tempfile.mkstemp(prefix=".finetune_state.", dir=directory)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, directory / STATE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    barrier()


def load_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               extras: dict[str, Any]) -> RunPosition | None:
    """The position to resume from, with the model, optimizer and extras restored; None when the
    directory holds no checkpoint yet (a first run). ``ValueError`` names what does not fit."""
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
        raise ValueError(f"{path}: not a readable fine-tuning checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a torchslim fine-tuning checkpoint (format {FORMAT})")
    if state["world_size"] != world_size():
        raise ValueError(f"{path} was written by a run of {state['world_size']} process(es), this one has "
                         f"{world_size()}: the data shards would differ; resume with the same number")
    _check_shapes(path, model, state["model"])
    if is_sharded(model):  # every rank holds the whole state: each keeps its shards
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    for key, obj in extras.items():
        if obj is not None and key in state:
            obj.load_state_dict(state[key])
    me = rank()
    return RunPosition(state["step"], state["epoch"], state["batch_in_epoch"], state["running"][me], state["count"][me],
                       list(state["losses"]), state["epoch_rng"][me], state["rng"][me])


def _full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and optimizer's whole state; under FSDP2 gathered from the shards (a
    collective: every rank calls it) to rank 0's CPU, by parameter name."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def _check_shapes(path: Path, model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    mine = model.state_dict()
    for key in sorted(set(mine) | set(saved)):
        if key not in saved or key not in mine:
            raise ValueError(f"{path}: '{key}' is {'missing from the checkpoint' if key not in saved else 'not in the model'}"
                             " (is this the same pruned model?)")
        if tuple(saved[key].shape) != tuple(mine[key].shape):
            raise ValueError(f"{path}: '{key}' has shape {list(saved[key].shape)}, the model's is "
                             f"{list(mine[key].shape)} (is this the same pruned model?)")
