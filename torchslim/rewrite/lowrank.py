"""Low-rank rewrite: a Linear or a convolution ``W`` (out x in*k*k) becomes two thinner layers
``A @ B`` of rank r by truncated SVD (Eckart-Young: the best rank-r fit in Frobenius norm; its
relative error is the discarded singular values' energy). With data, ``W`` is fitted in the
norm of its outputs by whitening with the input second moment (SVD-LLM, Wang et al. 2024):
``W S = U Sigma V^T`` with ``S S^T = E[x x^T]``, ``W' = U_r Sigma_r V_r^T S^-1``.

A convolution keeps its k x k taps, stride, padding and dilation in the first (thin) layer;
the second is a 1x1 convolution carrying the bias.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.pruning import register_replacement_type
from torchslim.rewrite._fit import Fit, relative_error, tail_errors
from torchslim.rewrite._stats import whitener


class LowRankLinear(nn.Sequential):
    """``Linear(in, out)`` as ``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True) -> None:
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))


class LowRankConv2d(nn.Sequential):
    """``Conv2d(in, out, k)`` as ``Conv2d(in, rank, k)`` (stride, padding, dilation kept) then a 1x1 ``Conv2d(rank, out)``."""

    def __init__(self, in_channels: int, rank: int, out_channels: int, kernel_size: Any = 1, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, bias: bool = True) -> None:
        super().__init__(
            nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False),
            nn.Conv2d(rank, out_channels, 1, bias=bias))


def _padding(conv: Any) -> Any:
    return conv.padding if isinstance(conv.padding, str) else list(conv.padding)


def _linear_init(m: Any) -> dict[str, Any]:
    return {"in_features": m[0].in_features, "rank": m[0].out_features, "out_features": m[1].out_features,
            "bias": m[1].bias is not None}


def _conv_init(m: Any) -> dict[str, Any]:
    first, second = m[0], m[1]
    return {"in_channels": first.in_channels, "rank": first.out_channels, "out_channels": second.out_channels,
            "kernel_size": list(first.kernel_size), "stride": list(first.stride), "padding": _padding(first),
            "dilation": list(first.dilation), "bias": second.bias is not None}


register_replacement_type(LowRankLinear, "torchslim.rewrite.LowRankLinear", init_of=_linear_init)
register_replacement_type(LowRankConv2d, "torchslim.rewrite.LowRankConv2d", init_of=_conv_init)


def max_rank(module: Any) -> int:
    """The rank at which the factorisation is exact: min(out, in*k*k)."""
    weight = module.weight
    return min(weight.shape[0], weight[0].numel())


def macs_per_position(module: Any, rank: int | None) -> int:
    """MACs per output position of the layer (rank None) or of its rank-r factorisation."""
    out, fan_in = module.weight.shape[0], module.weight[0].numel()
    return out * fan_in if rank is None else rank * (fan_in + out)


def _matrix(module: Any) -> torch.Tensor:
    return module.weight.detach().double().reshape(module.weight.shape[0], -1)


def _svd(module: Any, moment: torch.Tensor | None):
    weight = _matrix(module)
    if moment is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u, s, vh
    root, root_inv = whitener(moment.double())
    u, s, vh = torch.linalg.svd(weight @ root, full_matrices=False)
    return u, s, vh @ root_inv


def lowrank_errors(module: Any, moment: torch.Tensor | None = None) -> torch.Tensor:
    """Relative fit error for every rank 0..max_rank (on the data when ``moment`` is given)."""
    _, s, _ = _svd(module, moment)
    return tail_errors(s)


@torch.no_grad()
def fit_lowrank(module: Any, rank: int, moment: torch.Tensor | None = None) -> Fit:
    """The rank-``rank`` factorisation of a Linear or Conv2d, initialised by (whitened) truncated SVD."""
    u, s, vh = _svd(module, moment)
    root_s = s[:rank].sqrt()
    first_w, second_w = root_s[:, None] * vh[:rank], u[:, :rank] * root_s
    if isinstance(module, nn.Linear):
        block: Any = LowRankLinear(module.in_features, rank, module.out_features, bias=module.bias is not None)
    else:
        block = LowRankConv2d(module.in_channels, rank, module.out_channels, list(module.kernel_size),
                              list(module.stride), _padding(module), list(module.dilation), bias=module.bias is not None)
    weight = module.weight
    block = block.to(device=weight.device, dtype=weight.dtype)
    block[0].weight.copy_(first_w.reshape(block[0].weight.shape))
    block[1].weight.copy_(second_w.reshape(block[1].weight.shape))
    if module.bias is not None:
        block[1].bias.copy_(module.bias)
    energy = s.double() ** 2
    return Fit(block, relative_error(energy[rank:].sum(), energy.sum()))
