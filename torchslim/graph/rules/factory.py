"""Tensors made inside forward from sizes alone.

``zeros``, ``ones``, ``full`` and ``empty`` hold one value everywhere (``empty`` none yet: what
it holds is written later by ops that have rules), so any index of them is like any other and
they may shrink with whatever they meet (T5 adds a ``zeros((1, n_heads, q, k))`` position bias
to cross-attention scores; the literal ``n_heads`` follows the pruned heads). The ``*_like``
variants take their shape from a tensor and couple to it. Random factories (``randn``,
``arange``...) stay constants: their values differ per index.
"""
from __future__ import annotations

import torch

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import OpCall, Trace
from torchslim.graph.rules._registry import op_rule

aten = torch.ops.aten

#: factories whose every element holds the same value, and the position of their size argument
UNIFORM_FACTORIES = {aten.zeros: 0, aten.ones: 0, aten.full: 0, aten.empty: 0,
                     aten.new_zeros: 1, aten.new_ones: 1, aten.new_full: 1, aten.new_empty: 1}


@op_rule(*UNIFORM_FACTORIES)
def uniform_factory_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    """No index is special: nothing to couple or pin here (the graph leaves the outputs free)."""


@op_rule(aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like)
def like_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    c.same_all(op.inputs[0], op.outputs[0])
