"""Dilated rewrite: a large k x k convolution (k = 5, 7, ...) becomes a 3x3 convolution with
dilation (k-1)/2 covering the same receptive field with 9 of the k*k taps (Yu & Koltun 2016).

Without data the 3x3 kernel samples the original at the dilated taps (the other taps' weight
energy is the relative error). With data it is the least-squares fit on the layer's own inputs:
with ``C = E[x x^T]`` over the unfolded k x k patches and T the taps kept,
``W' = W C[:, T] C[T, T]^-1`` minimises ``E||W x - W' x_T||^2``; the error reported is the
relative error of the outputs. A kernel that is already dilated is reproduced exactly by both.
The result is a plain ``nn.Conv2d``; stride, padding and bias are kept.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.rewrite._fit import Fit, relative_error


def dilated_taps(conv: Any) -> list[int]:
    """The kept tap positions along one axis: 0, (k-1)/2, k-1."""
    k = conv.kernel_size[0]
    return [0, (k - 1) // 2, k - 1]


def macs_per_position(conv: Any, dilated: bool) -> int:
    """MACs per output position of the conv, or of its dilated 3x3 form."""
    return conv.out_channels * conv.in_channels * (9 if dilated else conv.weight[0, 0].numel())


def _tap_indices(conv: Any) -> torch.Tensor:
    k, taps = conv.kernel_size[0], dilated_taps(conv)
    per_channel = torch.tensor([i * k + j for i in taps for j in taps])
    return (torch.arange(conv.in_channels)[:, None] * k * k + per_channel).reshape(-1)


@torch.no_grad()
def fit_dilated(conv: Any, moment: torch.Tensor | None = None, ridge: float = 1e-10) -> Fit:
    """The dilated 3x3 form of ``conv`` (tap sampling, or least squares on ``moment`` = E[x x^T] of its patches)."""
    k = conv.kernel_size[0]
    weight = conv.weight.detach().double().reshape(conv.out_channels, -1)
    kept = _tap_indices(conv)
    if moment is None:
        fitted = weight[:, kept]
        mask = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
        mask[kept] = False
        error = relative_error((weight[:, mask] ** 2).sum(), (weight ** 2).sum())
    else:
        c = moment.double()
        block = c[kept][:, kept]
        block = block + ridge * float(block.diagonal().mean().clamp(min=1e-30)) * torch.eye(len(kept), dtype=c.dtype, device=c.device)
        fitted = torch.linalg.solve(block, (weight @ c[:, kept]).T).T
        diff = weight.clone()
        diff[:, kept] -= fitted
        error = relative_error(torch.trace(diff @ c @ diff.T), torch.trace(weight @ c @ weight.T))
    dilation = conv.dilation[0] * (k - 1) // 2
    new: Any = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=conv.stride,
                    padding=conv.padding if isinstance(conv.padding, str) else conv.padding,
                    dilation=dilation, bias=conv.bias is not None)
    new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    new.weight.copy_(fitted.reshape(new.weight.shape))
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return Fit(new, error)
