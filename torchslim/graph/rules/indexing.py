"""Embedding lookups: the embedding width couples to the output's last dim; the
vocabulary is indexed by data and is never pruned."""
from __future__ import annotations

import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.rules._registry import op_rule, tensor_arg

aten = torch.ops.aten


@op_rule(aten.embedding, aten._embedding_bag, aten.embedding_bag)
def embedding_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    weight, indices = tensor_arg(op, 0, "weight"), tensor_arg(op, 1, "indices")
    out = op.outputs[0]
    c.pin(weight, 0, "embedding vocabulary")
    c.same(weight, 1, out, -1)
    if op.func.overloadpacket is aten.embedding:
        for d in range(len(c.shape(indices))):
            c.same(indices, d, out, d)
