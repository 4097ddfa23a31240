"""Weight masks that stay enforced through training: after every optimizer step the masked
weights and their optimizer state (momentum, Adam moments) are zeroed again. Parameters
sharded by FSDP2 (``fully_shard``: DTensors) get the mask sharded like them."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


@dataclasses.dataclass
class WeightMasks:
    """Boolean keep-masks by parameter name; ``apply_`` zeroes what they drop."""

    model: nn.Module
    masks: dict[str, torch.Tensor]

    @torch.no_grad()
    def apply_(self) -> None:
        params = dict(self.model.named_parameters())
        for name, keep in self.masks.items():
            params[name].mul_(_shaped_like(keep, params[name]))

    @torch.no_grad()
    def zero_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        params = dict(self.model.named_parameters())
        for name, keep in self.masks.items():
            for value in optimizer.state.get(params[name], {}).values():
                if isinstance(value, torch.Tensor) and value.shape == keep.shape:
                    value.mul_(_shaped_like(keep, value))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-apply the masks after every ``optimizer.step()``; returns the hook handle."""

        def enforce(opt, args, kwargs) -> None:
            self.apply_()
            self.zero_optimizer_state_(opt)

        return optimizer.register_step_post_hook(enforce)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)


def _shaped_like(keep: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``keep`` in ``target``'s dtype, and sharded like it when it is a DTensor (FSDP2): every rank
    holds the whole mask, so each takes its own shard (``src_data_rank=None``: no communication)."""
    keep = keep.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        return distribute_tensor(keep, target.device_mesh, target.placements, src_data_rank=None)
    return keep
