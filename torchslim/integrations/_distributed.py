"""Masks under data parallelism: every rank must mask the same channels.

DistributedDataParallel keeps the weights equal on every rank, and AGP ranks channels by the
weights, so the masks agree; :func:`sync_masks_` makes sure of it after every mask update: it
broadcasts rank 0's masks, and when any rank computed different ones (a tie broken
differently, a non-deterministic kernel), every rank takes rank 0's masks, masked-atom record,
parameters and optimizer state, as DDP itself does at construction.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torchslim.sparsity import update_masks_


def world_size() -> int:
    """Processes in the default process group (1 when ``torch.distributed`` is not initialized)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def _comm_device() -> torch.device:
    """Where collectives run: the current GPU for NCCL, the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_(tensor: torch.Tensor, device: torch.device) -> None:
    """Rank 0's value into ``tensor`` on every rank (through ``device``, for the backend)."""
    buffer = tensor.detach().to(device).contiguous()
    torch.distributed.broadcast(buffer, 0)
    with torch.no_grad():
        tensor.copy_(buffer.to(tensor.device))


@torch.no_grad()
def sync_masks_(pruner: Any, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Make ``pruner``'s (an :class:`~torchslim.schedules.AGPPruner`) masks rank 0's on every rank.

    Returns True when some rank's masks differed (they, the masked weights and the optimizer
    state are now rank 0's), False when they already agreed or there is one process. Every rank
    must call it at the same mask update.
    """
    if world_size() <= 1:
        return False
    dist = torch.distributed
    device = _comm_device()
    masks: dict[str, torch.Tensor] = pruner.masks.masks
    names = sorted(masks)
    atoms = getattr(pruner, "masked_atoms", None)
    parts = [masks[n].reshape(-1) for n in names]
    if atoms is not None:
        parts.append(torch.from_numpy(np.asarray(atoms)))
    mine = torch.cat([p.to(device, torch.uint8) for p in parts]) if parts else torch.zeros(0, dtype=torch.uint8, device=device)
    size = torch.tensor([mine.numel()], device=device)
    dist.broadcast(size, 0)
    if int(size.item()) != mine.numel():
        raise RuntimeError(f"AGP masks differ in size across ranks ({mine.numel()} entries here, {int(size.item())} on "
                           "rank 0): the ranks are not pruning the same model")
    theirs = mine.clone()
    dist.broadcast(theirs, 0)
    differs = torch.tensor([int(not torch.equal(theirs, mine))], device=device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if not int(differs.item()):
        return False
    offset, new = 0, {}
    for name in names:
        n = masks[name].numel()
        new[name] = theirs[offset:offset + n].view(masks[name].shape).to(masks[name].device, torch.bool)
        offset += n
    if atoms is not None:
        pruner.masked_atoms = theirs[offset:].cpu().numpy().astype(bool)
    for param in pruner.model.parameters():  # rank 0's weights (dense ones too, with keep_dense) ...
        _broadcast_(param, device)
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        for value in state.values():  # ... and their optimizer state (the scalar step is equal anyway)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                _broadcast_(value, device)
    pruner.masks.masks = new
    if getattr(pruner, "keep_dense", False):
        update_masks_(pruner.model, new)
    else:
        pruner.masks.apply_()
        if optimizer is not None:
            pruner.masks.zero_optimizer_state_(optimizer)
    return True
