"""Weight masks that stay enforced through training: after every optimizer step the masked
weights and their optimizer state (momentum, Adam moments) are zeroed again."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class WeightMasks:
    """Boolean keep-masks by parameter name; ``apply_`` zeroes what they drop."""

    model: nn.Module
    masks: dict[str, torch.Tensor]

    @torch.no_grad()
    def apply_(self) -> None:
        params = dict(self.model.named_parameters())
        for name, keep in self.masks.items():
            params[name].mul_(keep.to(params[name].dtype))

    @torch.no_grad()
    def zero_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        params = dict(self.model.named_parameters())
        for name, keep in self.masks.items():
            for value in optimizer.state.get(params[name], {}).values():
                if isinstance(value, torch.Tensor) and value.shape == keep.shape:
                    value.mul_(keep.to(value.dtype))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Re-apply the masks after every ``optimizer.step()``; returns the hook handle."""

        def enforce(opt, args, kwargs) -> None:
            self.apply_()
            self.zero_optimizer_state_(opt)

        return optimizer.register_step_post_hook(enforce)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)
