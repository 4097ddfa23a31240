"""Collapsing: a rewritten block whose two linear maps are adjacent with no non-linearity
between them (``LowRankLinear``, ``LowRankConv2d``, ``SeparableConv2d``) is fused back into one
dense layer where that saves MACs, e.g. after pruning left a rank or multiplier so high that the
factorised form costs more than the dense one. The fusion is exact: the dense weight is the
product of the two maps (``W = P @ K`` per output position).
"""
from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import torch
from torch import nn

from torchslim.pruning import replace_module_
from torchslim.rewrite.lowrank import LowRankConv2d, LowRankLinear
from torchslim.rewrite.separable import SeparableConv2d

FACTORISED = (LowRankLinear, LowRankConv2d, SeparableConv2d)


def factorised_macs(block: Any) -> int:
    """MACs per output position of a factorised block (both layers)."""
    first, second = block[0], block[1]
    return first.weight.numel() + second.weight.numel()


def dense_macs(block: Any) -> int:
    """MACs per output position of the one dense layer the block equals."""
    first, second = block[0], block[1]
    fan_in = first.in_features if isinstance(block, LowRankLinear) else first.in_channels * first.weight[0, 0].numel()
    return second.weight.shape[0] * fan_in


@torch.no_grad()
def dense_equivalent(block: Any) -> nn.Module:
    """The dense ``nn.Linear`` / ``nn.Conv2d`` computing exactly what the block computes."""
    first, second = block[0], block[1]
    bias = second.bias is not None
    if isinstance(block, LowRankLinear):
        dense: Any = nn.Linear(first.in_features, second.out_features, bias=bias)
        weight = second.weight @ first.weight
    else:
        dense = nn.Conv2d(first.in_channels, second.out_channels, first.kernel_size, stride=first.stride,
                          padding=first.padding, dilation=first.dilation, bias=bias)
        pointwise = second.weight.flatten(1)  # (out, mid)
        if isinstance(block, SeparableConv2d):
            mult = first.out_channels // first.in_channels
            per_input = pointwise.reshape(-1, first.in_channels, mult)  # (out, in, mult)
            taps = first.weight.reshape(first.in_channels, mult, -1)  # (in, mult, k*k)
            weight = torch.einsum("oim,imt->oit", per_input, taps).reshape(dense.weight.shape)
        else:
            weight = (pointwise @ first.weight.flatten(1)).reshape(dense.weight.shape)
    dense = dense.to(device=first.weight.device, dtype=first.weight.dtype)
    dense.weight.copy_(weight)
    if bias:
        dense.bias.copy_(second.bias)
    return dense.train(block.training)


def collapse_(model: nn.Module, modules: Sequence[str] = ("*",), *, only_if_cheaper: bool = True) -> list[str]:
    """Fuse each factorised block matching ``modules`` into one dense layer (in place, recorded
    like any replacement) where that saves MACs (always with ``only_if_cheaper=False``); returns the names fused."""
    fused = []
    for name, module in list(model.named_modules()):
        if type(module) not in FACTORISED or not any(fnmatch.fnmatchcase(name, p) for p in modules):
            continue
        if only_if_cheaper and dense_macs(module) >= factorised_macs(module):
            continue
        replace_module_(model, name, dense_equivalent(module))
        fused.append(name)
    return fused
