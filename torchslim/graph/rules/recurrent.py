"""nn.LSTM, nn.GRU and nn.RNN, traced as one op per call (see ``ModuleOp``).

A hidden unit j of a layer is row j of every gate block of ``weight_ih``/``weight_hh`` and
their biases (i, f, g, o for LSTM; r, z, n for GRU), column j of the next step's
``weight_hh`` (or of ``weight_hr`` with projections), its slot in the output and in
``h_n``/``c_n``, and column j (and H + j, reversed) of the next layer's ``weight_ih``.
Removing it equals zeroing it: with its rows zero its gates are constants (LSTM: i = f = o
= 1/2, g = 0, so a cell state starting at 0 stays 0 and h = o * tanh(c) = 0; GRU: n = 0, so
h' = z * h stays 0; RNN: tanh(0) = relu(0) = 0), and with its columns zero nothing reads it.
With ``proj_size`` the state h has its own units (rows of ``weight_hr``, columns of
``weight_hh``), removed the same way. One module has one ``hidden_size`` (and ``proj_size``)
for all its layers and both directions, so unit j is removed from all of them together.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import ModuleOp, NodeRef, OpCall, Trace, trace_as_one_op
from torchslim.graph.rules._registry import op_rule

_ATTRIBUTES = ("mode", "hidden_size", "proj_size", "num_layers", "bidirectional", "batch_first")
LSTM, GRU, RNN = (ModuleOp(f"nn.{kind}", _ATTRIBUTES) for kind in ("LSTM", "GRU", "RNN"))
RECURRENT_OPS = (LSTM, GRU, RNN)
for _module_type, _op in zip((nn.LSTM, nn.GRU, nn.RNN), RECURRENT_OPS):
    trace_as_one_op(_module_type, _op)

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
HELD = "recurrent layer: layer index, packed-sequence bookkeeping"


def _node(value) -> int | None:
    return value.node if isinstance(value, NodeRef) else None


def _data(value) -> int:
    """The data tensor of an input or output: a tensor, or a PackedSequence's first field."""
    node = _node(value[0]) if isinstance(value, tuple) else _node(value)
    if node is None:  # the rule fails and the layer is pinned
        raise ValueError("the recurrent layer's data is not a traced tensor")
    return node


def _states(value) -> list[int | None]:
    """(h, c) nodes of an LSTM state tuple, (h,) of a GRU/RNN state; [] when absent."""
    if value is None:
        return []
    return [_node(v) for v in value] if isinstance(value, tuple) else [_node(value)]


class _Units:
    """Representative element ids of the cell units (H) and of the state units (proj or H)."""

    def __init__(self, c: Coupling, op: OpCall):
        kw = op.kwargs
        self.params = {name: ref.node for name, ref in kw["parameters"].items()}
        self.hidden = kw["hidden_size"]
        self.cell = c.ids(self.params["weight_ih_l0"], 0)[: self.hidden]
        self.state = c.ids(self.params["weight_hr_l0"], 0) if kw["proj_size"] else self.cell

    def couple(self, c: Coupling, node: int, dim: int, units: np.ndarray) -> None:
        """Index i of ``node.dim`` is unit ``i % len(units)`` (gate blocks, directions)."""
        ids = c.ids(node, dim)
        c.union(ids, units[np.arange(ids.size) % units.size])


@op_rule(*RECURRENT_OPS)
def recurrent_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    kw = op.kwargs
    units = _Units(c, op)
    args, output = kw["args"], kw["output"]
    x, out = _data(args[0]), _data(output[0])
    directions = ("", "_reverse") if kw["bidirectional"] else ("",)
    for layer in range(kw["num_layers"]):
        for suffix in directions:
            _couple_layer(c, units, layer, suffix, x)
    units.couple(c, out, -1, units.state)
    for d in range(len(c.shape(x)) - 1):  # time and batch (or packed rows) are the input's
        c.same(x, d, out, d)
    packed = isinstance(args[0], tuple)
    batch = None if packed or len(c.shape(x)) < 3 else (0 if kw["batch_first"] else 1)
    initial = _states(args[1] if len(args) > 1 else kw["kwargs"].get("hx"))
    for states in (initial, _states(output[1])):
        for node, width in zip(states, (units.state, units.cell)):
            if node is not None:
                units.couple(c, node, -1, width)
                if batch is not None and len(c.shape(node)) == 3:
                    c.same(node, 1, x, batch)
    for node in initial:  # the layer index (and a packed batch, whose rows are not the input's)
        if node is not None:
            for d in range(len(c.shape(node)) - 1):
                if d == 0 or batch is None:
                    c.pin(node, d, HELD)
    if packed:
        for value in args[0][1:]:
            node = _node(value)
            if node is not None:
                c.pin(node, None, HELD)


def _couple_layer(c: Coupling, units: _Units, layer: int, suffix: str, x: int) -> None:
    params = units.params
    name = f"l{layer}{suffix}"
    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        if f"{kind}_{name}" in params:
            units.couple(c, params[f"{kind}_{name}"], 0, units.cell)  # every gate block
    units.couple(c, params[f"weight_hh_{name}"], 1, units.state)
    if f"weight_hr_{name}" in params:
        units.couple(c, params[f"weight_hr_{name}"], 0, units.state)
        units.couple(c, params[f"weight_hr_{name}"], 1, units.cell)
    if layer:  # the previous layer's output: both directions' states side by side
        units.couple(c, params[f"weight_ih_{name}"], 1, units.state)
    else:
        c.same(params[f"weight_ih_{name}"], 1, x, -1)


@op_rule(torch.ops.aten._pack_padded_sequence)
def pack_padded_sequence_rule(c: Coupling, op: OpCall, trace: Trace) -> None:
    """(T, B, *features) or (B, T, *features) -> (rows, *features): features pass through."""
    padded, data = op.inputs[0], op.outputs[0]
    for d in range(2, len(c.shape(padded))):
        c.same(padded, d, data, d - 1)
    for d in (0, 1):
        c.pin(padded, d, "packed into rows")
    for node in op.inputs[1:]:
        c.pin(node, None, "sequence lengths")


def recurrent_macs(op: OpCall, shapes) -> int:
    """Every row of the input (time x batch, or a packed sequence's rows) goes through every
    weight matrix once: input-to-gates, state-to-gates and projection (biases count 0)."""
    kw = op.kwargs
    x = shapes(_data(kw["args"][0]))
    rows = int(np.prod(x[:-1]))
    return rows * sum(int(np.prod(shapes(ref.node))) for ref in kw["parameters"].values()
                      if len(shapes(ref.node)) == 2)
