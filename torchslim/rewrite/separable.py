"""Depthwise-separable rewrite: a k x k convolution ``W`` (Cout, Cin, k, k) becomes a depthwise
k x k convolution with depth multiplier r (Cin*r channels) and a pointwise 1x1 convolution
(MobileNet, Howard et al. 2017). For each input channel c the slice ``W[:, c]`` (Cout x k*k) is
approximated at rank r by its truncated SVD ``U_r Sigma_r V_r^T``: the depthwise filters are
``Sigma_r^1/2 V_r^T`` and the pointwise weights ``U_r Sigma_r^1/2``. This is the best fit of the
form (Eckart-Young per slice, the slices being independent), exact when r >= min(Cout, k*k);
the relative error is the discarded singular values' energy over the weight's. Stride,
padding, dilation and bias are kept.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.pruning import register_replacement_type
from torchslim.rewrite._fit import Fit, relative_error


class SeparableConv2d(nn.Sequential):
    """Depthwise ``Conv2d(in, in*multiplier, k, groups=in)`` then pointwise ``Conv2d(in*multiplier, out, 1)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, multiplier: int = 1, bias: bool = True) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels * multiplier, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=in_channels, bias=False),
            nn.Conv2d(in_channels * multiplier, out_channels, 1, bias=bias))


def _init_of(m: Any) -> dict[str, Any]:
    depthwise, pointwise = m[0], m[1]
    return {"in_channels": depthwise.in_channels, "out_channels": pointwise.out_channels,
            "kernel_size": list(depthwise.kernel_size), "stride": list(depthwise.stride),
            "padding": depthwise.padding if isinstance(depthwise.padding, str) else list(depthwise.padding),
            "dilation": list(depthwise.dilation), "multiplier": depthwise.out_channels // depthwise.groups,
            "bias": pointwise.bias is not None}


register_replacement_type(SeparableConv2d, "torchslim.rewrite.SeparableConv2d", init_of=_init_of)


def max_multiplier(conv: Any) -> int:
    """The multiplier at which the rewrite is exact: min(Cout, k*k)."""
    return min(conv.out_channels, conv.weight[0, 0].numel())


def macs_per_position(conv: Any, multiplier: int | None) -> int:
    """MACs per output position of the conv (multiplier None) or of its separable form."""
    taps = conv.weight[0, 0].numel()
    if multiplier is None:
        return conv.out_channels * conv.in_channels * taps
    return conv.in_channels * multiplier * (taps + conv.out_channels)


def _slices_svd(conv: Any):
    slices = conv.weight.detach().double().flatten(2).transpose(0, 1)  # (Cin, Cout, k*k)
    return torch.linalg.svd(slices, full_matrices=False)  # u (Cin, Cout, q), s (Cin, q), vh (Cin, q, k*k)


def separable_errors(conv: Any) -> torch.Tensor:
    """Relative fit error for every multiplier 0..max_multiplier."""
    _, s, _ = _slices_svd(conv)
    energy = (s ** 2).sum(0)  # per rank index, summed over input channels
    total = energy.sum()
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return torch.sqrt(tails / total) if float(total) > 0 else torch.zeros_like(tails)


@torch.no_grad()
def fit_separable(conv: Any, multiplier: int) -> Fit:
    """The depthwise-separable form of ``conv`` with depth multiplier ``multiplier``, fitted per input channel by SVD."""
    u, s, vh = _slices_svd(conv)
    r = multiplier
    root_s = s[:, :r].sqrt()  # (Cin, r)
    depthwise = (root_s[:, :, None] * vh[:, :r]).reshape(conv.in_channels * r, 1, *conv.kernel_size)
    pointwise = (u[:, :, :r] * root_s[:, None, :]).permute(1, 0, 2).reshape(conv.out_channels, conv.in_channels * r)
    block: Any = SeparableConv2d(conv.in_channels, conv.out_channels, list(conv.kernel_size), list(conv.stride),
                            conv.padding if isinstance(conv.padding, str) else list(conv.padding),
                            list(conv.dilation), r, bias=conv.bias is not None)
    block = block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    block[0].weight.copy_(depthwise)
    block[1].weight.copy_(pointwise[:, :, None, None])
    if conv.bias is not None:
        block[1].bias.copy_(conv.bias)
    energy = s ** 2
    return Fit(block, relative_error(energy[:, r:].sum(), energy.sum()))
