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

from torchslim.distributed import all_reduce_arrays, broadcast_array, broadcast_tensors_, is_distributed
from torchslim.sparsity import update_masks_


@torch.no_grad()
def sync_masks_(pruner: Any, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Make ``pruner``'s (an :class:`~torchslim.schedules.AGPPruner`) masks rank 0's on every rank.

    Returns True when some rank's masks differed (they, the masked weights and the optimizer
    state are now rank 0's), False when they already agreed or there is one process. Every rank
    must call it at the same mask update.
    """
    if not is_distributed():
        return False
    masks: dict[str, torch.Tensor] = pruner.masks.masks
    names = sorted(masks)
    atoms = getattr(pruner, "masked_atoms", None)
    parts = [masks[n].reshape(-1).cpu().numpy().astype(np.int64) for n in names]
    if atoms is not None:
        parts.append(np.asarray(atoms, dtype=np.int64))
    mine = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    theirs = broadcast_array(mine)
    if theirs.size != mine.size:
        raise RuntimeError(f"AGP masks differ in size across ranks ({mine.size} entries here, {theirs.size} on "
                           "rank 0): the ranks are not pruning the same model")
    if not all_reduce_arrays({"differs": int(not np.array_equal(theirs, mine))})["differs"]:
        return False
    offset, new = 0, {}
    for name in names:
        n = masks[name].numel()
        new[name] = torch.from_numpy(theirs[offset:offset + n]).view(masks[name].shape).to(masks[name].device, torch.bool)
        offset += n
    if atoms is not None:
        pruner.masked_atoms = theirs[offset:].astype(bool)
    params = list(pruner.model.parameters())  # rank 0's weights (dense ones too, with keep_dense) ...
    states = [v for p in params for v in (optimizer.state.get(p, {}) if optimizer is not None else {}).values()
              if isinstance(v, torch.Tensor) and v.dim() > 0]  # ... and their optimizer state (step is equal)
    broadcast_tensors_(params + states)
    pruner.masks.masks = new
    if getattr(pruner, "keep_dense", False):
        update_masks_(pruner.model, new)
    else:
        pruner.masks.apply_()
        if optimizer is not None:
            pruner.masks.zero_optimizer_state_(optimizer)
    return True
