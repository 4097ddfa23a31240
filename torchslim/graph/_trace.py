"""Record a model's forward pass as a list of aten ops over tensor nodes.

Why dispatch-level tracing (``TorchDispatchMode``) and not torch.fx or torch.export:

* it runs the model eagerly on the example inputs, so any Python control flow
  (torchvision detection post-processing, HF attention-mask logic, ``if not inference``)
  simply executes, where fx's symbolic tracing and export's graph capture break on
  data-dependent branches;
* it needs no gradients and no trainable parameters: it works under ``no_grad``, on
  frozen models and in eval mode;
* every Python-level function (``F.linear``, ``einsum``, ``x[:, :8]``, ``chunk``) arrives
  decomposed into a small, stable set of aten ops, so the channel rules are written
  once per aten op instead of once per Python spelling.

Module scope comes from forward pre/post hooks; parameters and buffers are recognised
by object identity, so the graph knows which weight slice belongs to which module.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchslim._inputs import ExampleInputs, iter_tensors, normalize_inputs
from torchslim.modes import training_mode

INPUT, PARAM, BUFFER, CONST, ACT = "input", "param", "buffer", "const", "act"


@dataclasses.dataclass(slots=True)
class TensorNode:
    """One tensor value seen during the forward pass."""

    index: int
    shape: tuple[int, ...]
    kind: str  # INPUT | PARAM | BUFFER | CONST | ACT
    name: str | None = None  # qualified parameter/buffer name, or input position
    itemsize: int = 4

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclasses.dataclass(slots=True)
class OpCall:
    """One aten op call: its inputs/outputs as node indices, arguments with tensors replaced by nodes."""

    index: int
    func: Any  # torch._ops.OpOverload
    args: tuple
    kwargs: dict
    inputs: list[int]
    outputs: list[int]
    module: str  # qualified name of the innermost module whose forward issued the op ("" = root)

    @property
    def name(self) -> str:
        return str(self.func)

    def arg(self, position: int, keyword: str, default: Any = None) -> Any:
        if position < len(self.args):
            return self.args[position]
        return self.kwargs.get(keyword, default)


class ModuleOp:
    """Stands for an aten op in the trace: one call of a module traced as a whole (its inner
    ops are not recorded). Recurrent layers are, because their inner ops depend on the backend
    (one ``mkldnn_rnn_layer`` per layer on CPU, ``_cudnn_rnn`` on CUDA, hundreds of matmuls and
    gates elsewhere) while their parameters say everything about their channels. The recorded
    :class:`OpCall` keeps the call's ``args``/``kwargs``/``output`` with tensors as
    :class:`NodeRef`, the module's own ``parameters`` by name and the ``attributes`` listed here,
    all in ``OpCall.kwargs``; op rules and MAC formulas register for the instance like an aten op.
    """

    tags: tuple = ()

    def __init__(self, name: str, attributes: tuple[str, ...] = ()):
        self.name = name
        self.attributes = attributes

    @property
    def overloadpacket(self) -> "ModuleOp":
        return self

    def __repr__(self) -> str:
        return self.name


_WHOLE_MODULES: dict[type[nn.Module], ModuleOp] = {}


def trace_as_one_op(module_type: type[nn.Module], op: ModuleOp) -> None:
    """Record every call of ``module_type`` (and of subclasses keeping its forward) as ``op``."""
    _WHOLE_MODULES[module_type] = op


def _whole_module_op(module: nn.Module) -> ModuleOp | None:
    for module_type, op in _WHOLE_MODULES.items():
        if isinstance(module, module_type) and type(module).forward is module_type.forward:
            return op
    return None


@dataclasses.dataclass(slots=True)
class NodeRef:
    """Placeholder for a tensor inside recorded op arguments."""

    node: int


@dataclasses.dataclass(slots=True)
class ModuleCall:
    """A module forward seen during the trace, with its first tensor input and output nodes."""

    name: str
    inputs: list[int]
    outputs: list[int]


@dataclasses.dataclass
class Trace:
    nodes: list[TensorNode]
    ops: list[OpCall]
    input_nodes: list[int]
    output_nodes: list[int]
    module_calls: dict[str, list[ModuleCall]]
    param_nodes: dict[str, int]  # qualified param/buffer name -> node index
    values: dict[int, torch.Tensor]  # small integer tensors (indices), by node

    @functools.cached_property
    def input_dependent(self) -> frozenset[int]:
        """Nodes whose values depend on the model's inputs (activations, as opposed to weights
        and what is computed from weights alone, such as ``weight.t()``)."""
        dependent = set(self.input_nodes)
        for op in self.ops:
            if any(i in dependent for i in op.inputs):
                dependent.update(op.outputs)
        return frozenset(dependent)

    @functools.cached_property
    def selected_weights(self) -> frozenset[int]:
        """Input-dependent nodes that are still weights: a weight picked by input-dependent
        indices (a mixture-of-experts layer's ``experts.down_proj[expert_ids]``) and views of
        it. A product with one is a layer, not a product of two activations."""
        aten = torch.ops.aten
        picks = {aten.index, aten.select, aten.index_select, aten.embedding}
        views = {aten.view, aten._unsafe_view, aten.reshape, aten.t, aten.transpose, aten.permute, aten.expand,
                 aten.unsqueeze, aten.squeeze, aten.slice, aten.clone, aten.contiguous, aten.alias}
        dependent = self.input_dependent
        selected: set[int] = set()
        for op in self.ops:
            if not op.inputs or not op.outputs:
                continue
            packet, source = op.func.overloadpacket, op.inputs[0]
            if (packet in picks and source not in dependent) or (packet in views and source in selected):
                selected.update(o for o in op.outputs if o in dependent)
        return frozenset(selected)

    @functools.cached_property
    def activations(self) -> frozenset[int]:
        """Input-dependent nodes that are not selected weights."""
        return self.input_dependent - self.selected_weights


class _Recorder(TorchDispatchMode):
    def __init__(self, named_tensors: dict[int, tuple[str, str, torch.Tensor]]):
        super().__init__()
        self.nodes: list[TensorNode] = []
        self.ops: list[OpCall] = []
        self._by_id: dict[int, int] = {}
        # a dead tensor's id may be reused: its weakref's callback forgets the id. Keeping every
        # activation alive instead would make the traced forward page-fault fresh memory for
        # all of them (ResNet-50: 65 ms instead of 36 ms)
        self._refs: dict[int, weakref.ref] = {}
        self._named = named_tensors
        self.module_stack: list[str] = [""]
        self.param_nodes: dict[str, int] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.inside_whole_module = 0  # > 0 while a module traced as one op runs: its inner ops are not recorded

    def node_for(self, tensor: torch.Tensor, kind: str = CONST, name: str | None = None) -> int:
        key = id(tensor)
        if key in self._by_id:
            return self._by_id[key]
        if key in self._named:
            kind, name, _ = self._named[key]
        return self._new_node(tensor, kind, name)

    def _new_node(self, tensor: torch.Tensor, kind: str, name: str | None) -> int:
        node = TensorNode(len(self.nodes), tuple(tensor.shape), kind, name, tensor.element_size())
        self.nodes.append(node)
        key = id(tensor)
        self._by_id[key] = node.index
        self._refs[key] = weakref.ref(tensor, functools.partial(self._forget, key))
        if not tensor.is_floating_point() and not tensor.is_complex() and tensor.numel() <= 1_000_000:
            self.values[node.index] = tensor
        if kind in (PARAM, BUFFER) and name is not None:
            self.param_nodes.setdefault(name, node.index)
        return node.index

    def _forget(self, key: int, _ref: weakref.ref) -> None:
        if self._refs.get(key) is _ref:
            del self._by_id[key], self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_whole_module:
            return out
        inputs: list[int] = []
        # one walk over the arguments both names the input nodes and replaces tensors by NodeRefs
        recorded_args = self._record_arguments(args, inputs)
        recorded_kwargs = self._record_arguments(kwargs, inputs)
        # an in-place op returns its (mutated) input: give the result a fresh version node
        outputs = [self._new_node(t, ACT, None) for t in _output_tensors(out)]
        self.ops.append(OpCall(len(self.ops), func, recorded_args, recorded_kwargs, inputs, outputs,
                               self.module_stack[-1]))
        return out

    def record_structure(self, obj: Any, nodes: list[int], fresh: bool = False) -> Any:
        """``obj`` (a module's inputs or outputs) with every tensor replaced by a NodeRef and
        tuples (PackedSequence too) made plain; ``fresh``: new nodes, as for op outputs."""
        if isinstance(obj, torch.Tensor):
            node = self._new_node(obj, ACT, None) if fresh else self.node_for(obj)
            nodes.append(node)
            return NodeRef(node)
        if isinstance(obj, (list, tuple)):
            return tuple(self.record_structure(o, nodes, fresh) for o in obj)
        if isinstance(obj, dict):
            return {k: self.record_structure(v, nodes, fresh) for k, v in obj.items()}
        return obj

    def record_whole_module(self, op: ModuleOp, module: nn.Module, name: str, call: tuple, output: Any) -> ModuleCall:
        """Append one OpCall for a whole module call (see :class:`ModuleOp`)."""
        inputs: list[int] = []
        args, kwargs = self.record_structure(call, inputs)
        params = {attr: NodeRef(self.node_for(p)) for attr, p in module.named_parameters(recurse=False)}
        outputs: list[int] = []
        recorded_output = self.record_structure(output, outputs, fresh=True)
        details = {"args": args, "kwargs": kwargs, "output": recorded_output, "parameters": params,
                   **{attr: getattr(module, attr) for attr in op.attributes}}
        self.ops.append(OpCall(len(self.ops), op, (), details, inputs + [ref.node for ref in params.values()],
                               outputs, name))
        return ModuleCall(name, inputs, outputs)

    def _record_arguments(self, obj: Any, inputs: list[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            node = self.node_for(obj)
            inputs.append(node)
            return NodeRef(node)
        if isinstance(obj, (list, tuple)):
            return type(obj)([self._record_arguments(o, inputs) for o in obj])
        if isinstance(obj, dict):
            return {k: self._record_arguments(v, inputs) for k, v in obj.items()}
        return obj


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors an aten op returned: one, or a (nested) tuple/list of them (no pytree walk,
    which costs more than the op on small tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def module_names(model: nn.Module) -> dict[int, str]:
    """Each module's canonical name, by ``id``: the first name ``named_modules`` reaches it
    under, which is the prefix its parameters carry in ``named_parameters`` and ``state_dict``
    (a module registered under two names, like MODNet's ``lr_branch.backbone``, is known by
    its first, ``backbone``)."""
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    return names


def module_aliases(model: nn.Module) -> dict[str, str]:
    """Every name a module can be reached under (``lr_branch.backbone.conv``) -> its canonical name."""
    canonical = module_names(model)
    return {name: canonical[id(module)] for name, module in model.named_modules(remove_duplicate=False)}


def _named_tensors(model: nn.Module) -> dict[int, tuple[str, str, torch.Tensor]]:
    named: dict[int, tuple[str, str, torch.Tensor]] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        named[id(p)] = (PARAM, name, p)
    for name, b in model.named_buffers(remove_duplicate=True):
        named.setdefault(id(b), (BUFFER, name, b))
    return named


def trace(model: nn.Module, example_inputs: ExampleInputs) -> Trace:
    """Run ``model`` once on ``example_inputs`` in eval mode under ``no_grad`` and record every aten op.

    The model's training flags are restored afterwards; parameters are not modified.
    """
    args, kwargs = normalize_inputs(example_inputs)
    recorder = _Recorder(_named_tensors(model))
    module_calls: dict[str, list[ModuleCall]] = {}
    names = module_names(model)
    pending: dict[int, list[int]] = {}

    def pre_hook(module: nn.Module, inputs: tuple) -> None:
        name = names.get(id(module), "?")
        recorder.module_stack.append(name)
        pending[id(module)] = [recorder.node_for(t) for t in iter_tensors(inputs)]

    def post_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        name = recorder.module_stack.pop()
        outs = [recorder._by_id[id(t)] for t in iter_tensors(output) if id(t) in recorder._by_id]
        module_calls.setdefault(name, []).append(ModuleCall(name, pending.pop(id(module), []), outs))

    calls: dict[int, tuple] = {}
    whole_ops = {id(m): op for m in model.modules() if (op := _whole_module_op(m)) is not None}

    def whole_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        recorder.module_stack.append(names.get(id(module), "?"))
        recorder.inside_whole_module += 1
        calls[id(module)] = (args, kwargs)

    def whole_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recorder.inside_whole_module -= 1
        name = recorder.module_stack.pop()
        call = recorder.record_whole_module(whole_ops[id(module)], module, name, calls.pop(id(module)), output)
        module_calls.setdefault(name, []).append(call)

    handles = []
    for module in model.modules():
        if id(module) in whole_ops:
            handles.append(module.register_forward_pre_hook(whole_pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(whole_post_hook, with_kwargs=True))
            continue
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    try:
        with training_mode(model, False):
            input_nodes = [recorder.node_for(t, INPUT, f"input{i}") for i, t in enumerate(iter_tensors((args, kwargs)))]
            with torch.no_grad(), recorder:
                output = model(*args, **kwargs)
            output_nodes = [recorder.node_for(t) for t in iter_tensors(output)]
    finally:
        for h in handles:
            h.remove()
    return Trace(
        nodes=recorder.nodes,
        ops=recorder.ops,
        input_nodes=input_nodes,
        output_nodes=output_nodes,
        module_calls=module_calls,
        param_nodes=recorder.param_nodes,
        values=recorder.values,
    )

