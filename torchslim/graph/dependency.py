"""The dependency graph: one traced model, its channel atoms and the groups they form.

``DependencyGraph.build(model, example_inputs)`` traces the model (``_trace``), runs every
op's coupling rule (``rules``) and every module rule, pins the model's inputs and
outputs, and labels each element with its atom. A *group* is a set of atoms that live
in the same tensor dimensions (e.g. the 64 output channels of a conv, its BatchNorm and
the next conv's input channels); it is the unit importance criteria rank and the
pruner cuts.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.graph import rules
from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import PARAM, BUFFER, CONST, OpCall, Trace, trace
from torchslim.graph.rules.pointwise import pointwise_rule

ModuleRule = Callable[[Coupling, nn.Module, str, Trace], None]
_MODULE_RULES: dict[type, ModuleRule] = {}


def register_module_rule(module_type: type) -> Callable[[ModuleRule], ModuleRule]:
    """Register extra couplings for a module type (called once per module of that type).

    Use it when a module's code ties dimensions that no single op shows, e.g. a packed
    projection whose width must equal its input width::

        @torchslim.register_module_rule(MyBlock)
        def _(c, module, name, trace):
            c.same(trace.param_nodes[f"{name}.proj.weight"], 0, trace.param_nodes[f"{name}.norm.weight"], 0)
    """

    def register(fn: ModuleRule) -> ModuleRule:
        _MODULE_RULES[module_type] = fn
        return fn

    return register


@dataclasses.dataclass
class Group:
    """Atoms pruned as one unit: they share tensor dimensions, so they are ranked together."""

    index: int
    atoms: np.ndarray  # atom labels
    exact: bool  # False when some atom feeds a statistic over its dimension (e.g. LayerNorm)
    params: list[tuple[str, int]]  # (parameter name, dim) slots the atoms live in

    def __len__(self) -> int:
        return int(self.atoms.size)


@dataclasses.dataclass
class OpBlocker:
    """Why some channels cannot be pruned: the op (or input/output) that pinned them."""

    op: str
    module: str
    shapes: list[tuple[int, ...]]
    reason: str
    nodes: list[int] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) or "scalar" for s in self.shapes)
        return f"{self.op} in module '{self.module}' (input shapes {shapes}): {self.reason}"


class DependencyGraph:
    """Channel dependencies of one model, found by tracing it once on example inputs."""

    def __init__(self, model: nn.Module, trace_: Trace, coupling: Coupling, blockers: list[OpBlocker]):
        self.model = model
        self.trace = trace_
        self.coupling = coupling
        self.blockers = blockers
        self.n_atoms, self.labels = coupling.components()
        self.atom_pinned = np.zeros(self.n_atoms, dtype=bool)
        np.logical_or.at(self.atom_pinned, self.labels, coupling.pinned)
        self.atom_pinned |= ~self._atoms_with_activations()  # e.g. conv kernel positions
        self.atom_inexact = np.zeros(self.n_atoms, dtype=bool)
        np.logical_or.at(self.atom_inexact, self.labels, coupling.inexact)
        self.groups = self._find_groups()

    # construction -------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, example_inputs: ExampleInputs, *, keep_inputs: bool = True,
              keep_outputs: bool = True) -> "DependencyGraph":
        """Trace ``model`` and couple its channels. Inputs and outputs keep their shapes by default."""
        recorded = trace(model, example_inputs)
        choices: dict[tuple[int, int], int] = {}
        for _ in range(MAX_RESHAPE_ROUNDS):
            coupling, blockers = _couple(model, recorded, choices, keep_inputs, keep_outputs)
            revised = _revise_reshape_choices(coupling, choices)
            if revised == choices:
                break
            choices = revised
        return cls(model, recorded, coupling, blockers)

    def _find_groups(self) -> list[Group]:
        """Atoms that share a (tensor, dim) slot form one group; only prunable atoms count."""
        prunable = ~self.atom_pinned
        c, labels = self.coupling, self.labels
        left, right, slot_params, weighted = [], [], {}, set()
        for node in self.trace.nodes:
            for d in range(node.ndim):
                atoms = np.unique(labels[c.ids(node.index, d)])
                atoms = atoms[prunable[atoms]]
                if atoms.size == 0:
                    continue
                left.append(atoms)
                right.append(np.full(atoms.size, atoms[0]))
                if node.kind in (PARAM, BUFFER):
                    slot_params.setdefault(int(atoms[0]), []).append((node.name, d))
                if node.kind == PARAM:
                    weighted.add(int(atoms[0]))
        if not left:
            return []
        left_a, right_a = np.concatenate(left), np.concatenate(right)
        matrix = coo_matrix((np.ones(left_a.size, dtype=np.int8), (left_a, right_a)), shape=(self.n_atoms,) * 2)
        _, family = connected_components(matrix, directed=False)
        members: dict[int, list[int]] = {}
        for atom in np.unique(left_a):
            members.setdefault(int(family[atom]), []).append(int(atom))
        params_by_family: dict[int, list[tuple[str, int]]] = {}
        for rep, slots in slot_params.items():
            params_by_family.setdefault(int(family[rep]), []).extend(slots)
        groups = []
        with_weights = {int(family[rep]) for rep in weighted}
        for fam, atoms in members.items():
            # activations only, or buffers only (e.g. a position index table): no weight to remove
            if fam not in params_by_family or fam not in with_weights:
                continue
            atoms_a = np.asarray(sorted(atoms), dtype=np.int64)
            params = sorted(set(params_by_family[fam]))
            groups.append(Group(len(groups), atoms_a, not bool(self.atom_inexact[atoms_a].any()), params))
        return groups

    def _atoms_with_activations(self) -> np.ndarray:
        """Atoms that touch at least one activation; weight-only atoms are never prunable."""
        has = np.zeros(self.n_atoms, dtype=bool)
        for node in self.trace.nodes:
            if node.kind not in (PARAM, BUFFER):
                for d in range(node.ndim):
                    has[self.labels[self.coupling.ids(node.index, d)]] = True
        return has

    # queries ------------------------------------------------------------
    def param_labels(self, name: str, dim: int) -> np.ndarray:
        """Atom label of every index of parameter/buffer ``name`` along ``dim``."""
        return self.labels[self.coupling.ids(self.trace.param_nodes[name], dim)]

    def removal(self, removed_atoms: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
        """Indices each parameter/buffer loses when ``removed_atoms`` go, per dim."""
        removed = np.zeros(self.n_atoms, dtype=bool)
        removed[np.asarray(removed_atoms, dtype=np.int64)] = True
        out: dict[str, dict[int, np.ndarray]] = {}
        for name, node_index in self.trace.param_nodes.items():
            node = self.trace.nodes[node_index]
            for d in range(node.ndim):
                gone = np.flatnonzero(removed[self.labels[self.coupling.ids(node_index, d)]])
                if gone.size:
                    out.setdefault(name, {})[d] = gone
        return out

    def new_shape(self, node_index: int, removed: np.ndarray) -> tuple[int, ...]:
        """Shape of a traced tensor after removing atoms (``removed`` is a boolean mask over atoms)."""
        node = self.trace.nodes[node_index]
        return tuple(
            int(size - removed[self.labels[self.coupling.ids(node_index, d)]].sum())
            for d, size in enumerate(node.shape)
        )

    def module_output_atoms(self, module_name: str) -> np.ndarray:
        """Atoms of a module's output channels: output dims coupled to the module's own parameters."""
        return self._io_atoms(module_name, outputs=True)

    def _io_atoms(self, module_name: str, outputs: bool) -> np.ndarray:
        c, labels = self.coupling, self.labels
        own = [idx for name, idx in self.trace.param_nodes.items() if _owned_by(name, module_name)]
        if not own:
            return np.zeros(0, dtype=np.int64)
        param_atoms = np.unique(np.concatenate([labels[c.ids(n, d)] for n in own for d in range(c.nodes[n].ndim)]))
        outs = [o for call in self.trace.module_calls.get(module_name, []) for o in (call.outputs if outputs else call.inputs)]
        out_atoms = [labels[c.ids(o, d)] for o in outs for d in range(c.nodes[o].ndim)]
        if not out_atoms:
            return np.zeros(0, dtype=np.int64)
        return np.intersect1d(param_atoms, np.concatenate(out_atoms))

    def module_input_atoms(self, module_name: str) -> np.ndarray:
        """Atoms of a module's input channels: input dims coupled to the module's own parameters."""
        return self._io_atoms(module_name, outputs=False)

    def explain(self, atoms: np.ndarray, limit: int = 3) -> list[OpBlocker]:
        """The blockers whose pins touch any of ``atoms`` (for error messages)."""
        wanted = np.atleast_1d(np.asarray(atoms, dtype=np.int64))
        found = []
        for blocker in self.blockers:
            ids = [self.coupling.ids(n, d) for n in blocker.nodes for d in range(self.coupling.nodes[n].ndim)]
            if ids and np.isin(self.labels[np.concatenate(ids)], wanted).any():
                found.append(blocker)
                if len(found) >= limit:
                    break
        return found

    def summary(self) -> dict:
        return {
            "ops": len(self.trace.ops),
            "tensors": len(self.trace.nodes),
            "elements": self.coupling.size,
            "atoms": self.n_atoms,
            "groups": len(self.groups),
            "prunable_atoms": int(sum(len(g) for g in self.groups)),
            "unsupported_ops": sorted({b.op for b in self.blockers}),
        }


MAX_RESHAPE_ROUNDS = 2


def _couple(model, recorded: Trace, choices, keep_inputs: bool, keep_outputs: bool) -> tuple[Coupling, list[OpBlocker]]:
    coupling = Coupling(recorded.nodes, choices)
    blockers: list[OpBlocker] = []
    for op in recorded.ops:
        _apply_op_rule(coupling, op, recorded, blockers)
    for name, module in model.named_modules():
        rule = next((r for t, r in _MODULE_RULES.items() if type(module) is t), None)
        if rule is not None and name in recorded.module_calls:
            rule(coupling, module, name, recorded)
    _pin_fixed_tensors(coupling, recorded, keep_inputs, keep_outputs)
    return coupling, blockers


def _revise_reshape_choices(c: Coupling, choices: dict) -> dict:
    """Point each split/merge at a digit that an op hinted as a pruning unit (attention heads).

    E.g. grouped-query attention views k as (2 kv heads, 8 dims): by default the 8-wide digit
    is preferred, but SDPA hints its head dim, which is connected to the kv-head digit.
    """
    if not c.hints or not c.reshape_choices:
        return choices
    _, labels = c.components()
    hinted = np.zeros(int(labels.max()) + 1, dtype=bool)
    hinted[labels[np.concatenate(c.hints)]] = True
    revised = dict(choices)
    for key, candidates in c.reshape_choices:
        for rank, dims in enumerate(candidates):
            if dims and hinted[labels[np.concatenate([c.ids(n, d) for n, d in dims])]].any():
                revised[key] = rank
                break
    return revised


def _owned_by(param_name: str, module_name: str) -> bool:
    prefix = f"{module_name}." if module_name else ""
    return param_name.startswith(prefix) and "." not in param_name[len(prefix):]


def _apply_op_rule(c: Coupling, op: OpCall, recorded: Trace, blockers: list[OpBlocker]) -> None:
    rule = rules.rule_for(op.func)
    if rule is None and rules.is_pointwise(op.func):
        rule = pointwise_rule
    if rule is None and not op.inputs:
        for n in op.outputs:  # factory op (zeros, arange, randn): a constant inside forward
            c.pin(n, None, f"{op.name} creates a constant")
        return
    reason = "no channel rule for this op"
    if rule is not None:
        first_edge = c.edge_count()
        try:
            rule(c, op, recorded)
            _pin_unlinked_outputs(c, op, first_edge)
            return
        except Exception as exc:  # a rule that cannot read this call pins instead of guessing
            reason = f"rule failed: {type(exc).__name__}: {exc}"
    for n in op.inputs + op.outputs:
        c.pin(n, None, f"{op.name}: {reason}")
    shapes = [c.shape(n) for n in op.inputs]
    blockers.append(OpBlocker(op.name, op.module or "<root>", shapes, reason, op.inputs + op.outputs))


def _pin_unlinked_outputs(c: Coupling, op: OpCall, first_edge: int) -> None:
    """An output index the op's rule linked to no input index (a conv's spatial positions, a
    grid sample's sampling points) cannot be removed by removing anything upstream: pin it."""
    touched = c.touched_since(first_edge)
    for out in op.outputs:
        for d in range(c.nodes[out].ndim):
            start, size = c.offsets[out][d], c.nodes[out].shape[d]
            free = np.ones(size, dtype=bool)  # a dim's ids are one contiguous range: mask, don't search
            free[touched[(touched >= start) & (touched < start + size)] - start] = False
            if free.any():
                c.pin_elements(start + np.flatnonzero(free))


def _pin_fixed_tensors(c: Coupling, recorded: Trace, keep_inputs: bool, keep_outputs: bool) -> None:
    for node in recorded.nodes:
        if node.kind == CONST:
            c.pin(node.index, None, "constant tensor created inside forward")
    if keep_inputs:
        for n in recorded.input_nodes:
            c.pin(n, None, "model input")
    if keep_outputs:
        for n in recorded.output_nodes:
            c.pin(n, None, "model output")
