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
import functools
import logging
from typing import Callable, Mapping, Sequence

import numpy as np
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim._registry import Registry
from torchslim.graph import rules
from torchslim.graph._coupling import Coupling, connected_components
from torchslim.graph._trace import PARAM, BUFFER, CONST, OpCall, Trace, trace
from torchslim.graph.rules.factory import UNIFORM_FACTORIES
from torchslim.graph.rules.pointwise import pointwise_rule
from torchslim.graph.rules.shape import BROADCAST_PIN

LOG = logging.getLogger(__name__)

ModuleRule = Callable[[Coupling, nn.Module, str, Trace], None]
_MODULE_RULES: Registry[type, ModuleRule] = Registry("module rule")


def register_module_rule(module_type: type, *, replace: bool = False) -> Callable[[ModuleRule], ModuleRule]:
    """Register extra couplings for a module type (called once per module of that type).

    A module uses the rule of its own type, else that of its nearest registered base class
    along its method resolution order (``type(module).__mro__``), so subclasses inherit a
    rule. Registering a type twice is refused (``ValueError``) unless ``replace=True``.

    Use it when a module's code ties dimensions that no single op shows, e.g. a packed
    projection whose width must equal its input width::

        @torchslim.register_module_rule(MyBlock)
        def _(c, module, name, trace):
            c.same(trace.param_nodes[f"{name}.proj.weight"], 0, trace.param_nodes[f"{name}.norm.weight"], 0)
    """
    return _MODULE_RULES.register(module_type, replace=replace)


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
        self._slot_start, self._slot_size, self._first_slot = coupling.slot_starts, coupling.slot_sizes, coupling.first_slot
        self._slot_of_element = np.repeat(np.arange(self._slot_size.size), self._slot_size)
        self._node_of_slot = np.repeat(np.arange(len(trace_.nodes)), np.diff(self._first_slot))
        self.atom_pinned = self._any_per_atom(coupling.pinned)
        self.atom_pinned |= ~self._atoms_with_activations()  # e.g. conv kernel positions
        self.atom_inexact = self._any_per_atom(coupling.inexact)
        self.groups = self._find_groups()
        self.atom_group = np.full(self.n_atoms, -1, dtype=np.int64)  # each atom's group index (-1: none)
        for group in self.groups:
            self.atom_group[group.atoms] = group.index
        self._macs_memo: dict[tuple, int] = {}  # (op index, shapes) -> MACs, for estimate_macs
        self._slot_dims: dict[str, frozenset[int]] | None = None
        self._parameters: dict[str, nn.Parameter] | None = None
        self._atom_widths: dict[int, int] = {}  # group index -> channels per atom

    # construction -------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, example_inputs: ExampleInputs, *, keep_inputs: bool = True,
              keep_outputs: bool = True) -> "DependencyGraph":
        """Trace ``model`` and couple its channels. Inputs and outputs keep their shapes by default."""
        recorded = trace(model, example_inputs)
        choices: dict[tuple[int, int], int] = {}
        held: list[np.ndarray] = []  # what no choice can lift: the same in every round, found once
        for _ in range(MAX_RESHAPE_ROUNDS):
            coupling, blockers = _couple(model, recorded, choices, keep_inputs, keep_outputs)
            revised = _revise_reshape_choices(coupling, choices, held)
            if revised == choices:
                break
            choices = revised
        _log_blockers(model, blockers)
        return cls(model, recorded, coupling, blockers)

    def _any_per_atom(self, element_flags: np.ndarray) -> np.ndarray:
        """Per atom: is the flag set on any of its elements."""
        return np.bincount(self.labels[element_flags], minlength=self.n_atoms) > 0

    def _find_groups(self) -> list[Group]:
        """Atoms that share a (tensor, dim) slot form one group; only prunable atoms count.

        Vectorised over all slots: the distinct (slot, atom) pairs link every atom of a slot
        to the slot's first atom, and the connected components of those links are the groups.
        """
        prunable = ~self.atom_pinned[self.labels]
        pairs = sorted_unique(self._slot_of_element[prunable] * self.n_atoms + self.labels[prunable])
        if pairs.size == 0:
            return []
        slot, atom = pairs // self.n_atoms, pairs % self.n_atoms
        first = np.ones(slot.size, dtype=bool)
        first[1:] = slot[1:] != slot[:-1]
        rep = atom[first][np.cumsum(first) - 1]  # each pair's slot representative (its smallest atom)
        _, family = connected_components(self.n_atoms, atom, rep)
        params_by_family: dict[int, set[tuple[str, int]]] = {}
        with_weights: set[int] = set()
        for s, a in zip(slot[first].tolist(), atom[first].tolist()):
            node = self.trace.nodes[self._node_of_slot[s]]
            if node.kind in (PARAM, BUFFER):
                params_by_family.setdefault(int(family[a]), set()).add((node.name, s - int(self._first_slot[node.index])))
                if node.kind == PARAM:
                    with_weights.add(int(family[a]))
        atoms_all = sorted_unique(atom)
        fams = family[atoms_all]
        order = np.argsort(fams, kind="stable")
        bounds = np.flatnonzero(np.diff(fams[order])) + 1
        groups: list[Group] = []
        for members in np.split(atoms_all[order], bounds):
            fam = int(family[members[0]])
            # activations only, or buffers only (e.g. a position index table): no weight to remove
            if fam not in params_by_family or fam not in with_weights:
                continue
            groups.append(Group(len(groups), members, not bool(self.atom_inexact[members].any()),
                                sorted(params_by_family[fam])))
        return groups

    def _atoms_with_activations(self) -> np.ndarray:
        """Atoms that touch at least one activation; weight-only atoms are never prunable."""
        is_act = np.asarray([node.kind not in (PARAM, BUFFER) for node in self.trace.nodes], dtype=bool)
        return self._any_per_atom(is_act[self._node_of_slot][self._slot_of_element])

    # queries ------------------------------------------------------------
    def param_labels(self, name: str, dim: int) -> np.ndarray:
        """Atom label of every index of parameter/buffer ``name`` along ``dim``."""
        return self.labels[self.coupling.ids(self.trace.param_nodes[name], dim)]

    def atom_width(self, group: Group) -> int:
        """Channels per atom of ``group`` in its narrowest parameter slot (1 for plain channels,
        the head dim for attention heads), so that ``round_to`` can count channels."""
        if group.index not in self._atom_widths:
            widths = []
            for name, dim in group.params:
                labels = self.param_labels(name, dim)
                mine = labels[self.atom_group[labels] == group.index]
                if mine.size:
                    widths.append(mine.size // sorted_unique(mine).size)
            self._atom_widths[group.index] = max(1, min(widths, default=1))
        return self._atom_widths[group.index]

    def parameters(self) -> dict[str, nn.Parameter]:
        """The model's parameters by name, as traced (one walk over the model, kept)."""
        if self._parameters is None:
            self._parameters = dict(self.model.named_parameters())
        return self._parameters

    def slot_dims(self, name: str) -> frozenset[int]:
        """The dims of parameter/buffer ``name`` that some group prunes."""
        if self._slot_dims is None:
            dims: dict[str, set[int]] = {}
            for group in self.groups:
                for param, dim in group.params:
                    dims.setdefault(param, set()).add(dim)
            self._slot_dims = {param: frozenset(d) for param, d in dims.items()}
        return self._slot_dims.get(name, frozenset())

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

    @property
    def index_buffers(self) -> dict[str, tuple[int, int]]:
        """Buffers that hold a permutation picking a channel dim (a channel shuffle's order),
        by name: the traced tensor they pick into and its dim. Removing channels slices them
        and renumbers their values (:meth:`index_entries_kept`); a permutation leaves them as
        they are."""
        nodes = self.trace.nodes
        return {str(nodes[index].name): where for index, where in self.coupling.index_buffers.items()}

    def index_entries_kept(self, removed_atoms: np.ndarray) -> dict[str, np.ndarray]:
        """Per index buffer that loses entries when ``removed_atoms`` go: the entries kept."""
        removed = np.zeros(self.n_atoms, dtype=bool)
        removed[np.asarray(removed_atoms, dtype=np.int64)] = True
        out = {}
        for name, (target, dim) in self.index_buffers.items():
            gone = removed[self.labels[self.coupling.ids(target, dim)]]
            if gone.any():
                out[name] = np.flatnonzero(~gone)
        return out

    def permutation(self, orders: Mapping[int, Sequence[int] | np.ndarray]) -> dict[str, dict[int, np.ndarray]]:
        """How every parameter/buffer is reordered when the atoms of some groups trade places.

        ``orders[g][i]`` is the atom whose channels move into the place of the i-th atom of
        group ``g`` (in ``group.atoms`` order); ``orders[g]`` must be a permutation of those
        atoms. Returns, per tensor and dim that changes, the index with which
        ``new = old.index_select(dim, index)``. In every traced tensor the k-th channel of an
        atom takes the k-th channel of the atom replacing it, so the model computes the same
        function; atoms that trade places must have as many channels as each other in every
        traced tensor (else ``ValueError`` naming the tensor). Index buffers keep their values:
        the channels they pick move with the channels they land on.
        """
        source = np.arange(self.n_atoms, dtype=np.int64)
        for g, order in orders.items():
            if not 0 <= g < len(self.groups):
                raise ValueError(f"no group {g}: the graph has {len(self.groups)} groups")
            atoms = self.groups[g].atoms
            order = np.asarray(order, dtype=np.int64)
            if order.shape != atoms.shape or not np.array_equal(np.sort(order), np.sort(atoms)):
                raise ValueError(f"the order for group {g} must be a permutation of its {atoms.size} atoms")
            source[atoms] = order
        moved = source != np.arange(self.n_atoms)
        if not moved.any():
            return {}
        self._check_equal_widths(source, moved)
        out: dict[str, dict[int, np.ndarray]] = {}
        index_buffers = self.index_buffers
        for name, node_index in self.trace.param_nodes.items():
            if name in index_buffers:
                continue
            for d in range(self.trace.nodes[node_index].ndim):
                labels = self.labels[self.coupling.ids(node_index, d)]
                if moved[labels].any():
                    out.setdefault(name, {})[d] = _substitution(labels, source)
        return out

    def interchangeable(self, group: Group) -> list[np.ndarray]:
        """The group's atoms split into classes whose members can trade places in
        :meth:`permutation`: the same number of channels in every traced tensor dim (a concat
        group has one class per producer; a plain group is one class). Each class keeps the
        ``group.atoms`` order; classes come in the order of their first atom."""
        n = self.n_atoms
        member = np.zeros(n, dtype=bool)
        member[group.atoms] = True
        elements = np.flatnonzero(member[self.labels])
        keys, counts = np.unique(self.labels[elements] * self._slot_size.size + self._slot_of_element[elements],
                                 return_counts=True)  # sorted by atom, then slot
        atoms = keys // self._slot_size.size
        signature: dict[int, list[tuple[int, int]]] = {}
        for atom, slot, count in zip(atoms.tolist(), (keys % self._slot_size.size).tolist(), counts.tolist()):
            signature.setdefault(atom, []).append((slot, count))
        classes: dict[tuple, list[int]] = {}
        for atom in group.atoms.tolist():
            classes.setdefault(tuple(signature.get(atom, ())), []).append(atom)
        return [np.asarray(c, dtype=np.int64) for c in classes.values()]

    def _check_equal_widths(self, source: np.ndarray, moved: np.ndarray) -> None:
        """Every moved atom has, in every traced tensor dim, as many channels as the atom it takes."""
        n = self.n_atoms
        elements = np.flatnonzero(moved[self.labels])
        keys, counts = np.unique(self._slot_of_element[elements] * n + self.labels[elements], return_counts=True)
        partner = keys // n * n + source[keys % n]
        at = np.minimum(np.searchsorted(keys, partner), keys.size - 1)
        bad = np.flatnonzero((keys[at] != partner) | (counts[at] != counts))
        if bad.size:
            slot, atom = int(keys[bad[0]] // n), int(keys[bad[0]] % n)
            node = self.trace.nodes[int(self._node_of_slot[slot])]
            dim = slot - int(self._first_slot[node.index])
            what = f"{node.kind} '{node.name}'" if node.name is not None else f"{node.kind} tensor of shape {node.shape}"
            raise ValueError(f"atoms {atom} and {int(source[atom])} cannot trade places: they have different "
                             f"numbers of channels in dim {dim} of the {what}")

    def shapes_after(self, removed: np.ndarray) -> list[tuple[int, ...]]:
        """Shape of every traced tensor after removing atoms (``removed``: boolean mask over
        atoms), all at once: per slot, its size minus its removed elements."""
        gone = np.concatenate(([0], np.cumsum(removed[self.labels], dtype=np.int64)))
        sizes = (self._slot_size - (gone[self._slot_start + self._slot_size] - gone[self._slot_start])).tolist()
        first = self._first_slot.tolist()
        return [tuple(sizes[first[i]:first[i + 1]]) for i in range(len(self.trace.nodes))]

    def new_shape(self, node_index: int, removed: np.ndarray) -> tuple[int, ...]:
        """Shape of a traced tensor after removing atoms (``removed`` is a boolean mask over atoms)."""
        node = self.trace.nodes[node_index]
        return tuple(
            int(size - removed[self.labels[self.coupling.ids(node_index, d)]].sum())
            for d, size in enumerate(node.shape)
        )

    @functools.cached_property
    def input_held(self) -> np.ndarray:
        """Per atom: held by the model's inputs and in no weight (a batch or sequence position):
        sizes along it come from the data, never from a module attribute. (An input's feature
        width is in a weight, and a layer's ``in_features`` holds it.)"""
        held = np.zeros(self.n_atoms, dtype=bool)
        held[self.labels[self.coupling.held_by((INPUT_PIN,))]] = True
        c = self.coupling
        for node in self.trace.param_nodes.values():
            for d in range(c.nodes[node].ndim):
                held[self.labels[c.ids(node, d)]] = False
        return held

    def data_sized(self, node: int, dim: int) -> bool:
        """Whether ``node``'s ``dim`` runs along the model inputs' own dims (its size is the data's)."""
        return bool(self.input_held[self.labels[self.coupling.ids(node, dim)]].all())

    def module_output_atoms(self, module_name: str) -> np.ndarray:
        """Atoms of a module's output channels (output dims coupled to the module's own
        parameters), and of the widths inside it that neither its input nor its output shows
        (a fused mixture-of-experts tensor's hidden units)."""
        outputs = self._io_atoms(module_name, outputs=True)
        if not self.trace.module_calls.get(module_name):
            return outputs
        seen = np.concatenate([self._call_atoms(module_name, True), self._call_atoms(module_name, False)])
        inner = np.setdiff1d(self._param_atoms(module_name), seen)
        return sorted_unique(np.concatenate([outputs, inner])) if inner.size else outputs

    def _param_atoms(self, module_name: str) -> np.ndarray:
        c, labels = self.coupling, self.labels
        own = [idx for name, idx in self.trace.param_nodes.items() if _owned_by(name, module_name)]
        if not own:
            return np.zeros(0, dtype=np.int64)
        return sorted_unique(np.concatenate([labels[c.ids(n, d)] for n in own for d in range(c.nodes[n].ndim)]))

    def _call_atoms(self, module_name: str, outputs: bool) -> np.ndarray:
        c, labels = self.coupling, self.labels
        nodes = [o for call in self.trace.module_calls.get(module_name, []) for o in (call.outputs if outputs else call.inputs)]
        atoms = [labels[c.ids(o, d)] for o in nodes for d in range(c.nodes[o].ndim)]
        return sorted_unique(np.concatenate(atoms)) if atoms else np.zeros(0, dtype=np.int64)

    def _io_atoms(self, module_name: str, outputs: bool) -> np.ndarray:
        param_atoms, call_atoms = self._param_atoms(module_name), self._call_atoms(module_name, outputs)
        if not param_atoms.size or not call_atoms.size:
            return np.zeros(0, dtype=np.int64)
        return np.intersect1d(param_atoms, call_atoms)

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


def _substitution(labels: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The index that puts, at the k-th position of every atom in ``labels``, the k-th position
    of the atom ``source`` names for it (positions counted in ascending order)."""
    by_atom = np.argsort(labels, kind="stable")  # positions grouped by atom, ascending within each
    grouped = labels[by_atom]
    rank = np.empty(labels.size, dtype=np.int64)
    rank[by_atom] = np.arange(labels.size) - np.searchsorted(grouped, grouped)
    return by_atom[np.searchsorted(grouped, source[labels]) + rank]


MAX_RESHAPE_ROUNDS = 3  # repeat_kv: the merge of repeated kv heads moves first, then the kv view


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` by sorting: numpy 2's hash-based unique is several times slower on the
    hundred-thousand-element integer arrays the graph works with."""
    ordered = np.sort(values, kind="stable")
    if ordered.size < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def _couple(model, recorded: Trace, choices, keep_inputs: bool, keep_outputs: bool) -> tuple[Coupling, list[OpBlocker]]:
    coupling = Coupling(recorded.nodes, choices)
    blockers: list[OpBlocker] = []
    for op in recorded.ops:
        _apply_op_rule(coupling, op, recorded, blockers)
    for name, module in model.named_modules():
        rule = _MODULE_RULES.for_type(type(module))
        if rule is not None and name in recorded.module_calls:
            rule(coupling, module, name, recorded)
    _pin_fixed_tensors(coupling, recorded, keep_inputs, keep_outputs)
    return coupling, blockers


def _revise_reshape_choices(c: Coupling, choices: dict, held: list[np.ndarray]) -> dict:
    """Point each split/merge at a digit that can be pruned: one an op hinted as a pruning unit
    (attention heads), else, when the preferred digit is held by the model's inputs, outputs or
    constants, the next that is not.

    E.g. grouped-query attention views k as (2 kv heads, 8 dims): by default the 8-wide digit
    is preferred, but SDPA (or the batched matmul of q and k) hints its head dim, which is
    connected to the kv-head digit. Repeating kv heads for their queries (``repeat_kv``:
    expand to (kv heads, n_rep), then merge) must couple the merged heads by the kv-head
    digit, since the n_rep copies are a broadcast. And InstanceNorm runs as a BatchNorm over
    (1, batch * C): at batch 8 the outer digit is the input's batch, which stays, so the
    channels are coupled by the C digit instead of pinned.
    """
    if not c.reshape_choices:
        return choices
    _, labels = c.components()
    hinted = np.zeros(int(labels.max()) + 1, dtype=bool)
    if c.hints:
        hinted[labels[np.concatenate(c.hints)]] = True
    if not held:  # ``held`` caches it for the next round
        held.append(_held_whatever_the_choices(c))
    fixed = held[0]
    revised = dict(choices)
    for key, candidates in c.reshape_choices:
        ids = [_own_ids(c, dims, candidates) for dims in candidates]
        usable = [i is not None and not fixed[i].all() for i in ids]
        rank = next((r for r, i in enumerate(ids) if usable[r] and hinted[labels[i]].any()), None)
        current = min(choices.get(key, 0), len(candidates) - 1)
        if rank is None and ids[current] is not None and not usable[current]:
            rank = next((r for r in range(len(candidates)) if usable[r]), None)
        if rank is not None:
            revised[key] = rank
    return revised


def _held_whatever_the_choices(c: Coupling) -> np.ndarray:
    """Per element: is it held by the model's interface or a broadcast, judged without the
    reshapes' digit choices, so that one reshape's current choice (repeated kv heads coupled by
    their copies) does not make another's look held. Choices change neither, so it holds for
    every round."""
    n_structural, structural = c.structural_components()
    fixed = np.zeros(n_structural, dtype=bool)
    fixed[structural[c.held_by(HELD_BY_STRUCTURE)]] = True
    return fixed[structural]


def _own_ids(c: Coupling, dims: list[tuple[int, int]], candidates: list[list[tuple[int, int]]]) -> np.ndarray | None:
    """Elements of the dims that hold one candidate digit and not every other: a dim spanning
    all of a chunk's digits carries whichever is chosen, so it says nothing about this one."""
    common = set.intersection(*(set(d) for d in candidates if d))
    own = [c.ids(n, d) for n, d in dims if (n, d) not in common]
    return np.concatenate(own) if own else None


def _owned_by(param_name: str, module_name: str) -> bool:
    prefix = f"{module_name}." if module_name else ""
    return param_name.startswith(prefix) and "." not in param_name[len(prefix):]


def _log_blockers(model: nn.Module, blockers: list[OpBlocker]) -> None:
    """Say which ops pinned their tensors for want of a rule: pruning stays exact but keeps those channels."""
    if not blockers:
        return
    LOG.info("%s: %d op call(s) without a usable channel rule pin every dimension they touch: %s",
             type(model).__name__, len(blockers), "; ".join(str(b) for b in blockers[:10]) +
             (f"; ... {len(blockers) - 10} more" if len(blockers) > 10 else ""))


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
        mark = c.edge_count()
        try:
            rule(c, op, recorded)
            if op.func.overloadpacket not in UNIFORM_FACTORIES:  # their indices are all alike: free
                _pin_unlinked_outputs(c, op, mark)
            return
        except Exception as exc:  # noqa: BLE001 - a rule that cannot read this call pins instead of guessing
            reason = f"rule failed: {type(exc).__name__}: {exc}"
    for n in op.inputs + op.outputs:
        c.pin(n, None, f"{op.name}: {reason}")
    shapes = [c.shape(n) for n in op.inputs]
    blockers.append(OpBlocker(op.name, op.module or "<root>", shapes, reason, op.inputs + op.outputs))


def _pin_unlinked_outputs(c: Coupling, op: OpCall, mark: tuple[int, int]) -> None:
    """An output index the op's rule linked to no input index (a conv's spatial positions, a
    grid sample's sampling points) cannot be removed by removing anything upstream: pin it."""
    touched = c.touched_since(mark)
    for out in op.outputs:
        # a tensor's elements, all dims, are one contiguous range of ids: mask, don't search
        start, size = int(c.offsets[out][0]) if c.nodes[out].ndim else 0, sum(c.nodes[out].shape)
        if not size:
            continue
        free = np.ones(size, dtype=bool)
        free[touched[(touched >= start) & (touched < start + size)] - start] = False
        if free.any():
            c.pin_elements(start + np.flatnonzero(free))


CONSTANT_PIN, INPUT_PIN, OUTPUT_PIN = "constant tensor created inside forward", "model input", "model output"
FIXED_PINS = (CONSTANT_PIN, INPUT_PIN, OUTPUT_PIN)  # what the model's interface holds, not an op
# pins no reshape choice can lift: the interface's, and broadcast copies (a digit of copies is never a unit)
HELD_BY_STRUCTURE = FIXED_PINS + (BROADCAST_PIN,)


def _pin_fixed_tensors(c: Coupling, recorded: Trace, keep_inputs: bool, keep_outputs: bool) -> None:
    for node in recorded.nodes:
        if node.kind == CONST:
            c.pin(node.index, None, CONSTANT_PIN)
    if keep_inputs:
        for n in recorded.input_nodes:
            c.pin(n, None, INPUT_PIN)
    if keep_outputs:
        for n in recorded.output_nodes:
            c.pin(n, None, OUTPUT_PIN)
