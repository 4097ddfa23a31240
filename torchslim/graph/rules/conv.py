"""aten.convolution: plain, grouped, depthwise and transposed, in 1d/2d/3d.

Grouped convs keep their group count: input channels that share a local index in every
group are one atom (the weight's in-dimension is shared by the groups), and so are output
channels with the same local index, so every group keeps the same width. Transposed convs
are the mirror image (weight ``(in, out / groups, k...)``: the out-dimension is shared).
Depthwise convs (one input channel per group, transposed or not) couple each input channel
to its own outputs, and the group count follows the channel count.
"""
from __future__ import annotations

import numpy as np
import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.conv_args import CONVOLUTIONS, conv_args
from torchslim.graph.rules._registry import node_arg, op_rule, tensor_arg

aten = torch.ops.aten


def _same_local_index(c: Coupling, node: int, dim: int, width: int) -> None:
    """Couple indices of ``node.dim`` that have the same position inside their group of ``width``."""
    ids = c.ids(node, dim)
    c.union(ids, ids[np.arange(ids.size) % width])


def _couple_groups(c: Coupling, x: int, out: int, weight: int, groups: int, transposed: bool) -> None:
    cin, cout = c.shape(x)[1], c.shape(out)[1]
    cin_g, cout_g = cin // groups, cout // groups
    in_dim, out_dim = (0, 1) if transposed else (1, 0)  # weight dims holding in / out channels
    if groups == 1:
        c.same(x, 1, weight, in_dim)
        c.same(out, 1, weight, out_dim)
        return
    if cin_g == 1:  # depthwise (channel multiplier cout_g): input channel i alone makes outputs i*cout_g...
        c.same(x if transposed else out, 1, weight, 0)
        outs = np.arange(cout, dtype=np.int64)
        c.union(c.ids(out, 1, outs), c.ids(x, 1, outs // cout_g))
        return
    # a grouped weight holds every channel of one side along its first dim, and the channels of
    # one group of the other side along its second, which every group shares by local index
    own, shared = (x, out) if transposed else (out, x)
    c.same(own, 1, weight, 0)
    width = cout_g if transposed else cin_g
    shared_index = np.arange(c.shape(shared)[1], dtype=np.int64) % width
    c.union(c.ids(shared, 1), c.ids(weight, 1, shared_index))
    _same_local_index(c, own, 1, cin_g if transposed else cout_g)


@op_rule(*CONVOLUTIONS)
def convolution_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    x, weight, out = tensor_arg(op, 0, "input"), tensor_arg(op, 1, "weight"), op.outputs[0]
    bias = node_arg(op, 2, "bias")
    args = conv_args(op)
    transposed, groups = args.transposed, args.groups
    batched = len(c.shape(x)) == len(c.shape(weight))
    if not batched:
        c.pin(x, None, "unbatched convolution")
        c.pin(out, None, "unbatched convolution")
        return
    c.same(x, 0, out, 0)
    _couple_groups(c, x, out, weight, groups, transposed)
    if bias is not None:
        c.same(bias, 0, out, 1)
