"""Normalisations. BatchNorm (and InstanceNorm, which runs as a reshaped BatchNorm) is
per channel; when it normalises with its input's own statistics (training mode, weight
standardisation) the dims it reduces over are marked inexact. LayerNorm's statistics run
over the normalised dims, so pruning them is marked inexact; GroupNorm channels are removed
a whole group at a time, which keeps the other groups' statistics and therefore the outputs
exact."""
from __future__ import annotations

import numpy as np
import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.rules._registry import node_arg, op_rule, tensor_arg

aten = torch.ops.aten


@op_rule(aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit, aten.native_batch_norm,
         aten._native_batch_norm_legit_functional, aten.batch_norm, aten._batch_norm_with_update,
         aten._batch_norm_no_update, aten.cudnn_batch_norm, aten.miopen_batch_norm)
def batch_norm_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    x = tensor_arg(op, 0, "input")
    for position, keyword in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")):
        param = node_arg(op, position, keyword)
        if param is not None:
            c.same(param, 0, x, 1)
    for out in op.outputs:
        if c.shape(out) == c.shape(x):
            c.same_all(x, out)
        elif len(c.shape(out)) == 1 and c.shape(out)[0] == c.shape(x)[1]:
            c.same(out, 0, x, 1)
    if _uses_batch_statistics(op):  # e.g. timm's ScaledStdConv2d standardises its weight this way
        for d in range(len(c.shape(x))):
            if d != 1:
                c.mark_inexact(x, d, f"{op.name} computes statistics over this dimension")


def _uses_batch_statistics(op: OpCall) -> bool:
    """Whether the batch norm normalises with statistics of its input (training mode, no
    running stats) rather than stored running statistics."""
    packet = op.func.overloadpacket
    if packet in (aten._native_batch_norm_legit_no_training, aten._batch_norm_no_update):
        return False
    if packet is aten._batch_norm_with_update or op.func._overloadname == "no_stats":
        return True
    return bool(op.arg(5, "training", False))


@op_rule(aten.native_layer_norm, aten.layer_norm, aten._fused_rms_norm, aten.rms_norm)
def layer_norm_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    x = tensor_arg(op, 0, "input")
    normalized = op.arg(1, "normalized_shape")
    k = len(normalized)
    ndim = len(c.shape(x))
    for position, keyword in ((2, "weight"), (3, "bias")):
        param = node_arg(op, position, keyword)
        if param is not None:
            for d in range(k):
                c.same(param, d, x, ndim - k + d)
    c.same_all(x, op.outputs[0])
    for d in range(ndim - k, ndim):
        c.mark_inexact(x, d, f"{op.name} normalises over this dimension")
    for stat in op.outputs[1:]:
        for d in range(min(ndim - k, len(c.shape(stat)))):
            c.same(x, d, stat, d)


@op_rule(aten.native_group_norm, aten.group_norm)
def group_norm_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    x = tensor_arg(op, 0, "input")
    groups = op.arg(6, "group") if op.func.overloadpacket is aten.native_group_norm else op.arg(1, "num_groups")
    channels = c.shape(x)[1]
    for position, keyword in ((1, "weight"), (2, "bias")):
        param = node_arg(op, position, keyword)
        if param is not None:
            c.same(param, 0, x, 1)
    ids = c.ids(x, 1)
    width = channels // groups
    c.union(ids, ids[(np.arange(channels) // width) * width])  # one atom per group
    c.same_all(x, op.outputs[0])
    for stat in op.outputs[1:]:
        c.same(x, 0, stat, 0)
