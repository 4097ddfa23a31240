"""The arguments of a traced convolution, read in one place.

aten spells a convolution several ways: ``convolution`` / ``_convolution`` (input, weight,
bias, stride, padding, dilation, transposed, output_padding, groups, ...) and the functional
``conv1d/2d/3d`` (input, weight, bias, stride, padding, dilation, groups; never transposed).
The graph's coupling rule, the MAC formula and the latency cost model all read them here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from torchslim.graph._trace import OpCall

aten = torch.ops.aten

#: ops whose schema is ``convolution``'s (with ``transposed`` and ``output_padding``)
FULL_SCHEMA = (aten.convolution, aten._convolution)
#: every spelling of a convolution that the trace may record
CONVOLUTIONS = (*FULL_SCHEMA, aten.conv1d, aten.conv2d, aten.conv3d)


@dataclasses.dataclass(frozen=True)
class ConvArgs:
    """A convolution's hyper-parameters as traced (tensor arguments stay trace references)."""

    stride: Any
    padding: Any
    dilation: Any
    groups: int
    transposed: bool
    has_bias: bool

    def depthwise(self, in_channels: int) -> bool:
        """One input channel per group (MobileNet's depthwise convs)."""
        return self.groups > 1 and self.groups == in_channels


def is_convolution(op: OpCall) -> bool:
    return op.func.overloadpacket in CONVOLUTIONS


def conv_args(op: OpCall) -> ConvArgs:
    """``op``'s convolution arguments, whichever aten spelling recorded it."""
    full = op.func.overloadpacket in FULL_SCHEMA
    return ConvArgs(
        stride=op.arg(3, "stride", 1),
        padding=op.arg(4, "padding", 0),
        dilation=op.arg(5, "dilation", 1),
        groups=int(op.arg(8, "groups", 1) if full else op.arg(6, "groups", 1)),
        transposed=bool(op.arg(6, "transposed", False)) if full else False,
        has_bias=op.arg(2, "bias") is not None,
    )
