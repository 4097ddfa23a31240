"""What one rewrite of one layer produced: the block and its fit's relative error."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class Fit:
    """A replacement block initialised from a trained layer, with the fit's relative error
    (Frobenius norm of the weight error over the weight's, or over the outputs on the data
    when the fit was data-aware)."""

    block: nn.Module
    error: float


def relative_error(discarded: torch.Tensor, total: torch.Tensor) -> float:
    """sqrt(discarded energy / total energy), 0 for an all-zero layer."""
    total_f = float(total)
    return 0.0 if total_f <= 0 else float(torch.sqrt(torch.clamp(discarded / total, min=0.0)))


def tail_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """For each rank r (index r, 0..n): the relative error of keeping the r largest singular
    values (Eckart-Young: the discarded values' energy over the total)."""
    energy = singular_values.double() ** 2
    total = energy.sum()
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return torch.sqrt(tails / total) if float(total) > 0 else torch.zeros_like(tails)
