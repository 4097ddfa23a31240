"""Ops that work along the trailing spatial dims and keep batch and channels: pooling,
interpolation, padding, pixel (un)shuffle and channel shuffle."""
from __future__ import annotations

import numpy as np
import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.rules._registry import op_rule

aten = torch.ops.aten

_SPATIAL_DIMS = {
    **dict.fromkeys(("avg_pool1d", "max_pool1d", "max_pool1d_with_indices", "adaptive_avg_pool1d",
                     "adaptive_max_pool1d", "_adaptive_avg_pool1d", "upsample_nearest1d", "upsample_linear1d",
                     "reflection_pad1d", "replication_pad1d", "_upsample_nearest_exact1d"), 1),
    **dict.fromkeys(("avg_pool2d", "max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d",
                     "_adaptive_avg_pool2d", "adaptive_max_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
                     "upsample_bicubic2d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
                     "_upsample_nearest_exact2d", "reflection_pad2d", "replication_pad2d",
                     "im2col", "col2im", "fractional_max_pool2d"), 2),
    **dict.fromkeys(("avg_pool3d", "max_pool3d", "max_pool3d_with_indices", "adaptive_avg_pool3d",
                     "_adaptive_avg_pool3d", "adaptive_max_pool3d", "upsample_nearest3d", "upsample_trilinear3d",
                     "_upsample_nearest_exact3d", "reflection_pad3d", "replication_pad3d"), 3),
}


def _leading_same(c: Coupling, source: int, out: int, spatial: int) -> None:
    ndim = len(c.shape(source))
    for d in range(ndim - spatial):
        if d < len(c.shape(out)):
            c.same(source, d, out, d)


def spatial_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    spatial = _SPATIAL_DIMS[op.func.overloadpacket.__name__]
    for out in op.outputs:
        _leading_same(c, op.inputs[0], out, spatial)


for _name in _SPATIAL_DIMS:
    if hasattr(aten, _name):
        op_rule(getattr(aten, _name))(spatial_rule)


@op_rule(aten.constant_pad_nd, aten.pad)
def pad_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source, out = op.inputs[0], op.outputs[0]
    pads = list(op.arg(1, "pad"))
    ndim = len(c.shape(source))
    for d in range(ndim):
        k = ndim - 1 - d  # pad pairs start from the last dim
        before, after = (pads[2 * k], pads[2 * k + 1]) if 2 * k + 1 < len(pads) else (0, 0)
        if before == 0 and after == 0:
            c.same(source, d, out, d)
        else:
            c.pin(source, d, "padded dimension")
            c.pin(out, d, "padded dimension")


def _couple_channel_blocks(c: Coupling, source: int, out: int, fine: int) -> None:
    """Channel ``i`` of the ``fine`` tensor belongs to channel ``i // r^2`` of the other one."""
    coarse = out if fine == source else source
    r2 = c.shape(fine)[-3] // c.shape(coarse)[-3]
    for d in range(len(c.shape(source)) - 3):
        c.same(source, d, out, d)
    index = np.arange(c.shape(fine)[-3], dtype=np.int64)
    c.union(c.ids(fine, -3), c.ids(coarse, -3, index // r2))


@op_rule(aten.pixel_shuffle)
def pixel_shuffle_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    _couple_channel_blocks(c, op.inputs[0], op.outputs[0], fine=op.inputs[0])


@op_rule(aten.pixel_unshuffle)
def pixel_unshuffle_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    _couple_channel_blocks(c, op.inputs[0], op.outputs[0], fine=op.outputs[0])


@op_rule(aten.native_channel_shuffle, aten.channel_shuffle)
def channel_shuffle_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    source, out = op.inputs[0], op.outputs[0]
    groups = op.arg(1, "groups")
    channels = c.shape(source)[1]
    width = channels // groups
    for d in range(len(c.shape(source))):
        if d != 1:
            c.same(source, d, out, d)
    ins = np.arange(channels, dtype=np.int64)
    local = ins % width  # atom: the same local index in every group
    c.union(c.ids(source, 1), c.ids(source, 1, local))
    outs = local * groups + ins // width  # where input channel ins lands
    c.union(c.ids(source, 1), c.ids(out, 1, outs))


@op_rule(aten.grid_sampler_2d, aten.grid_sampler_3d, aten.grid_sampler)
def grid_sample_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    """Output positions are the grid's sampling points: they follow the grid, not the input."""
    source, grid, out = op.inputs[0], op.inputs[1], op.outputs[0]
    c.same(source, 0, out, 0)
    c.same(source, 1, out, 1)
    for d in range(2, len(c.shape(out))):
        c.same(grid, d - 1, out, d)
