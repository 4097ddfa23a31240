"""Physical removal: slice parameters and buffers, update module attributes, roll back on error.

Every change goes through a :class:`Transaction` that records the old value, so a
failure anywhere leaves the model exactly as it was (same parameter objects, same
attributes). Parameters and buffers are sliced in place (``tensor.data`` is swapped), so
the objects an optimizer, a tied module or the user holds stay the ones the model uses.
Module attributes follow the new weights through per-type handlers
(``register_module_handler``); integer attributes used as literal sizes inside forward
(``self.num_heads`` in a view, ``self.split`` in ``x[:, :self.split]``) are found by
matching the traced op arguments against the module's integer attributes.
"""
from __future__ import annotations

import copy
import functools
import sys
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from torchslim._registry import Registry
from torchslim.graph import DependencyGraph
from torchslim.graph import OpCall, module_names
from torchslim.graph.rules.factory import UNIFORM_FACTORIES

aten = torch.ops.aten
_MISSING = object()


CONFIG_PREFIX = "config."


def get_attribute(obj: Any, name: str, default: Any = _MISSING) -> Any:
    """``obj.name``; ``"config.X"`` reads field X of the module's Hugging Face config."""
    if name.startswith(CONFIG_PREFIX):
        obj, name = getattr(obj, "config", None), name[len(CONFIG_PREFIX):]
    return getattr(obj, name) if default is _MISSING else getattr(obj, name, default)


def has_attribute(obj: Any, name: str) -> bool:
    """Whether ``get_attribute(obj, name)`` finds a value."""
    sentinel = object()
    return get_attribute(obj, name, sentinel) is not sentinel


class Transaction:
    """Records attribute and parameter changes so they can be undone in reverse order.

    ``"config.X"`` sets field X on a copy of the module's config that the module then owns,
    so that layers read their own head counts where the model's config holds one for all
    (Phi-3's attention slices its fused projection at ``config.num_attention_heads * head_dim``).
    """

    def __init__(self, release: bool = False) -> None:
        self._undo: list[Callable[[], None]] = []
        self.changes: dict[str, dict[str, Any]] = {}
        # release: a sliced tensor keeps only its removed slices for the undo, not its old data,
        # so the old storage is freed at once (see slice_to_kept)
        self.release = release

    def setattr(self, obj: Any, name: str, value: Any, label: str = "") -> None:
        self.changes.setdefault(label, {})[name] = value
        if name.startswith(CONFIG_PREFIX):
            own = copy.copy(obj.config)
            setattr(own, name[len(CONFIG_PREFIX):], value)
            name, value = "config", own
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    def set_tensor(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        """Register a different tensor object as ``module.name`` (``set_data`` keeps the object)."""
        store: dict[str, Any] = module._parameters if name in module._parameters else module._buffers
        old = store[name]
        store[name] = value
        self._undo.append(lambda: store.__setitem__(name, old))

    def set_data(self, tensor: torch.Tensor, data: torch.Tensor, grad: torch.Tensor | None = None, *,
                 restore: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
        """Give ``tensor`` (a parameter or buffer) new ``data`` in place, keeping the object itself.

        Its gradient becomes ``grad``; without one it stays when the shape is unchanged and is
        dropped when not. The undo restores the old data and gradient objects, bit for bit; or,
        given ``restore`` (a function rebuilding them, bit for bit), the old ones are not kept
        and their memory is released as soon as nothing else holds it.
        """
        same_shape = data.shape == tensor.shape
        old_data, old_grad = (tensor.data, tensor.grad) if restore is None else (None, None)
        new_grad = tensor.grad if same_shape and grad is None else grad
        tensor.grad = None  # a gradient must always match the data's shape: clear it while swapping
        _set_data(tensor, data)
        tensor.grad = new_grad

        def undo() -> None:
            back_data, back_grad = (old_data, old_grad) if restore is None else restore()
            assert back_data is not None
            tensor.grad = None
            _set_data(tensor, back_data)
            tensor.grad = back_grad

        self._undo.append(undo)

    def replace_module(self, model: nn.Module, path: str, new: nn.Module) -> nn.Module:
        """Put ``new`` at ``path`` (a submodule of ``model``, not the model itself); returns the old one."""
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        modules = parent._modules
        if name not in modules:
            raise AttributeError(f"{type(parent).__name__} has no submodule '{name}'")
        old = modules[name]
        if old is None:
            raise AttributeError(f"{type(parent).__name__}.{name} is None, not a module")
        modules[name] = new
        self._undo.append(lambda: modules.__setitem__(name, old))
        return old

    def drop_entries(self, container: nn.Module, indices: set[int]) -> list[nn.Module | None]:
        """Remove the entries ``indices`` of an ``nn.ModuleList`` / ``nn.Sequential`` and number the
        rest from 0 again (as ``del container[i]`` does); returns the removed modules."""
        old = container._modules
        entries = list(old.values())
        if any(not 0 <= i < len(entries) for i in indices):
            raise IndexError(f"entries {sorted(indices)} out of range for a container of {len(entries)} modules")
        object.__setattr__(container, "_modules", {str(i): m for i, m in enumerate(
            m for k, m in enumerate(entries) if k not in indices)})
        self._undo.append(lambda: object.__setattr__(container, "_modules", old))
        return [m for k, m in enumerate(entries) if k in indices]

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


# a handler receives an instance of the type it is registered for (so it may annotate that type)
ModuleHandler = Callable[[Any, "SurgeryContext"], None]
_HANDLERS: Registry[type, ModuleHandler] = Registry("module handler")


def register_module_handler(module_type: type, *, replace: bool = False) -> Callable[[ModuleHandler], ModuleHandler]:
    """Register how a module type updates its attributes after its weights were sliced.

    A module runs the handler of its own type, else that of its nearest registered base class
    along its method resolution order (``type(module).__mro__``): the most specific handler
    wins, whatever the registration order. Registering a type twice is refused (``ValueError``)
    unless ``replace=True``.

    The handler receives the module and a :class:`SurgeryContext` (``ctx.set(module, attr, value)``,
    ``ctx.shape(module, "weight")`` the planned shape of a parameter, ``ctx.input_shape(module)``,
    ``ctx.output_shape(module)``, ``ctx.old(module, attr)``). Handlers that read sizes from
    ``ctx.shape`` rather than the tensors themselves also serve planning
    (:func:`torchslim.pruning.plan_removal`), which runs them before any tensor is sliced.
    """
    return _HANDLERS.register(module_type, replace=replace)


class SurgeryContext:
    """What a module handler sees: planned shapes and the attribute values it sets.

    With ``tx`` the values are set on the modules (inside the transaction); without one
    (planning) they are only recorded in :attr:`planned`, and the model is never touched.
    Without a ``graph`` (a removal the graph does not plan, such as whole experts: pass
    ``model``) only the planned tensor shapes are known; input and output shapes are None.
    """

    def __init__(self, graph: DependencyGraph | None, removed_atoms: np.ndarray, tx: Transaction | None,
                 tensor_shapes: dict[int, tuple[int, ...]] | None = None, model: nn.Module | None = None):
        self.graph = graph
        self.removed = np.zeros(graph.n_atoms if graph is not None else 0, dtype=bool)
        self.removed[removed_atoms] = True
        self.tx = tx
        owner = graph.model if graph is not None else model
        if owner is None:
            raise ValueError("SurgeryContext needs a graph or a model")
        self.names = module_names(owner)
        self._old: dict[tuple[int, str], Any] = {}
        self._value: dict[tuple[int, str], Any] = {}
        self.touched: set[tuple[int, str]] = set()
        self.planned: dict[str, dict[str, Any]] = {}  # module name -> attribute -> new value
        self._shapes = tensor_shapes or {}

    def set(self, module: nn.Module, attr: str, value: Any) -> None:
        self.touched.add((id(module), attr))  # set by a handler: derived-size rules leave it alone
        if self.value(module, attr, _MISSING) == value:
            return
        self._old.setdefault((id(module), attr), get_attribute(module, attr, None))
        self._value[(id(module), attr)] = value
        label = self.names.get(id(module), "")
        self.planned.setdefault(label, {})[attr] = value
        if self.tx is not None:
            self.tx.setattr(module, attr, value, label)

    def value(self, module: nn.Module, attr: str, default: Any = None) -> Any:
        """The attribute's value after the removal as planned so far."""
        return self._value.get((id(module), attr), get_attribute(module, attr, default))

    def old(self, module: nn.Module, attr: str) -> Any:
        return self._old.get((id(module), attr), get_attribute(module, attr))

    def shape(self, module: nn.Module, attr: str) -> tuple[int, ...]:
        """The planned shape of the parameter or buffer ``module.attr`` (tied ones included)."""
        tensor = getattr(module, attr)
        return self._shapes.get(id(tensor), tuple(tensor.shape))

    def _call_nodes(self, module: nn.Module, outputs: bool) -> list[int]:
        if self.graph is None:
            return []
        calls = self.graph.trace.module_calls.get(self.names.get(id(module), ""), [])
        return [n for call in calls for n in (call.outputs if outputs else call.inputs)]

    def input_shape(self, module: nn.Module) -> tuple[int, ...] | None:
        nodes = self._call_nodes(module, outputs=False)
        return self.graph.new_shape(nodes[0], self.removed) if nodes and self.graph is not None else None

    def output_shape(self, module: nn.Module) -> tuple[int, ...] | None:
        nodes = self._call_nodes(module, outputs=True)
        return self.graph.new_shape(nodes[0], self.removed) if nodes and self.graph is not None else None


def kept_indices(graph: DependencyGraph, removed_atoms: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """Per parameter/buffer name, per dim that shrinks: the indices kept (from the current shapes)."""
    return _kept_from(named_tensors(graph.model), graph.removal(removed_atoms))


def _kept_from(tensors: dict[str, torch.Tensor], removal: dict[str, dict[int, np.ndarray]]) -> dict[str, dict[int, np.ndarray]]:
    return {name: {dim: _complement(tensors[name].shape[dim], gone) for dim, gone in dims.items()}
            for name, dims in removal.items()}


def planned_attributes(graph: DependencyGraph, removed_atoms: np.ndarray,
                       kept: dict[str, dict[int, np.ndarray]]) -> tuple[dict[str, dict[str, Any]], list[OpCall]]:
    """The module attributes that change when ``removed_atoms`` go (module name -> attr -> value),
    computed by the handlers from the planned shapes, and the ops whose literal sizes changed
    but matched no module attribute. Nothing is modified."""
    ctx = SurgeryContext(graph, removed_atoms, None, _planned_tensor_shapes(graph.model, kept))
    _run_handlers(graph.model, ctx)
    unresolved = _rewrite_literals(graph, ctx)
    return ctx.planned, unresolved


def handler_attributes(model: nn.Module, modules: list[nn.Module],
                       tensor_shapes: dict[int, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """The attributes the registered handlers of ``modules`` would set for the planned tensor
    shapes (by tensor id), planned without a traced graph (module name -> attr -> value); for
    removals the graph does not plan (whole experts: a router ``nn.Linear``'s ``out_features``)."""
    if "transformers" in sys.modules:
        _register_transformers_handlers()
    ctx = SurgeryContext(None, np.zeros(0, dtype=np.int64), None, tensor_shapes, model=model)
    for module in modules:
        handler = _HANDLERS.for_type(type(module))
        if handler is not None:
            handler(module, ctx)
    return ctx.planned


def _planned_tensor_shapes(model: nn.Module, kept: dict[str, dict[int, np.ndarray]]) -> dict[int, tuple[int, ...]]:
    tensors = named_tensors(model)
    shapes = {}
    for name, dims in kept.items():
        shape = list(tensors[name].shape)
        for dim, keep in dims.items():
            shape[dim] = len(keep)
        shapes[id(tensors[name])] = tuple(shape)
    return shapes


def _run_handlers(model: nn.Module, ctx: SurgeryContext) -> None:
    if "transformers" in sys.modules:  # an HF model: its module types are importable cheaply now
        _register_transformers_handlers()
    for module in model.modules():
        handler = _HANDLERS.for_type(type(module))
        if handler is not None:
            handler(module, ctx)


def apply_removal(graph: DependencyGraph, removed_atoms: np.ndarray, tx: Transaction) -> tuple[dict, list[OpCall]]:
    """Remove ``removed_atoms`` from the model in place (inside ``tx``).

    Returns the per-parameter removal and the ops whose literal sizes changed but matched
    no module attribute (suspects if the pruned model later misbehaves).
    """
    model = graph.model
    removal = graph.removal(removed_atoms)
    tensors = named_tensors(model)
    kept = _kept_from(tensors, removal)  # from the shapes before any slicing
    shapes = _planned_tensor_shapes(model, kept)
    renumbered = renumbered_indices(graph, removed_atoms)
    for name, dims in kept.items():
        slice_to_kept(tensors[name], dims, tx)
    set_renumbered(model, renumbered, tx)
    ctx = SurgeryContext(graph, removed_atoms, tx, shapes)
    _run_handlers(model, ctx)
    unresolved = _rewrite_literals(graph, ctx)
    return removal, unresolved


def renumbered_indices(graph: DependencyGraph, removed_atoms: np.ndarray) -> dict[str, torch.Tensor]:
    """The new values of the graph's index buffers (permutations that pick channels) once
    ``removed_atoms`` go: the kept entries, renumbered to count the kept channels only."""
    tensors = named_tensors(graph.model)
    return {name: renumbered_index(tensors[name], kept) for name, kept in graph.index_entries_kept(removed_atoms).items()}


def renumbered_index(values: torch.Tensor, kept: np.ndarray) -> torch.Tensor:
    """A permutation index buffer cut to its ``kept`` entries, each value replaced by its rank
    among the kept values: the channels it picks from lost exactly the values it dropped."""
    values = values.detach()
    picked = values.index_select(0, torch.as_tensor(kept, dtype=torch.long, device=values.device))
    return torch.argsort(torch.argsort(picked)).to(values.dtype)


def set_renumbered(model: nn.Module, values: dict[str, torch.Tensor], tx: Transaction) -> None:
    """Write the renumbered index buffers (:func:`renumbered_indices`) inside ``tx``."""
    tensors = named_tensors(model)
    for name, value in values.items():
        tx.set_data(tensors[name], value.clone())


def _set_data(tensor: torch.Tensor, data: torch.Tensor) -> None:
    """``tensor.data = data``, and a new shape drops the tensor's gradient accumulator.

    Autograd caches one accumulator node per leaf, with the leaf's shape, for as long as any
    graph holds it (a loss tensor kept from the last training step does): a backward through a
    graph built after pruning would find that node and refuse the new gradient's shape. torch
    drops the cache only when ``.data`` changes dtype or device, so a changed shape takes a
    detour through an empty tensor of another dtype (nothing is copied)."""
    if tensor.requires_grad and data.shape != tensor.shape and data.is_floating_point():
        other = torch.float64 if data.dtype != torch.float64 else torch.float32
        tensor.data = torch.empty(0, dtype=other, device=data.device)
    tensor.data = data


def _complement(size: int, gone: np.ndarray) -> np.ndarray:
    keep = np.ones(size, dtype=bool)
    keep[gone] = False
    return np.flatnonzero(keep)


def slice_to_kept(tensor: torch.Tensor, kept: dict[int, np.ndarray], tx: Transaction) -> None:
    """Slice a parameter or buffer in place (inside ``tx``) to a contiguous copy holding only the
    ``kept`` indices of each dim; its gradient, if any, is sliced alike. The object stays the
    same, so every module it is registered in (tied weights) and every optimizer holding it
    see the new data.

    Under ``tx.release``, a tensor that alone holds its (contiguous) storage keeps only its
    removed slices for the undo, which puts the kept and removed slices back together bit for
    bit (in a new storage; a gradient is kept whole): the old storage is freed at once, so
    slicing a model tensor by tensor never holds more than the model's own size (plus one
    tensor)."""
    if tx.release and _owns_storage(tensor):
        old_grad = tensor.grad  # gradients are kept whole: the same object comes back
        data, removed = _split_kept(tensor.detach(), kept)
        grad = _index_kept(old_grad.detach(), kept) if old_grad is not None else None
        tx.set_data(tensor, data, grad, restore=lambda: (_join_kept(data, removed), old_grad))
        return
    data = _index_kept(tensor.detach(), kept)
    grad = _index_kept(tensor.grad.detach(), kept) if tensor.grad is not None else None
    tx.set_data(tensor, data, grad)


def _index_kept(tensor: torch.Tensor, kept: dict[int, np.ndarray]) -> torch.Tensor:
    """A contiguous copy of ``tensor`` with only the ``kept`` indices of each dim (never a view)."""
    new = tensor
    for dim, keep in kept.items():
        new = new.index_select(dim, torch.as_tensor(keep, dtype=torch.long, device=new.device))
    return new.contiguous() if kept else new.clone()  # index_select already copied: never aliases the old


# per dim peeled off: (dim, kept indices, removed indices, the removed slab)
_Removed = list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]


def _split_kept(tensor: torch.Tensor, kept: dict[int, np.ndarray]) -> tuple[torch.Tensor, _Removed]:
    """``_index_kept`` and what it drops, dim by dim: the slab of removed indices along the
    first dim (whole), then along the next dim of what was kept... Together the slabs hold
    exactly the removed elements once; :func:`_join_kept` puts the tensor back together."""
    new, removed = tensor, []
    for dim, keep in kept.items():
        keep_index = torch.as_tensor(keep, dtype=torch.long, device=new.device)
        gone_index = torch.as_tensor(_complement(new.shape[dim], keep), dtype=torch.long, device=new.device)
        removed.append((dim, keep_index, gone_index, new.index_select(dim, gone_index)))
        new = new.index_select(dim, keep_index)
    return (new.contiguous() if kept else new.clone()), removed


def _join_kept(kept: torch.Tensor, removed: _Removed) -> torch.Tensor:
    """The contiguous tensor ``_split_kept`` was given, from its kept part and removed slabs."""
    whole = kept
    for dim, keep_index, gone_index, slab in reversed(removed):
        shape = list(whole.shape)
        shape[dim] = keep_index.numel() + gone_index.numel()
        rebuilt = whole.new_empty(shape)
        rebuilt.index_copy_(dim, keep_index, whole)
        rebuilt.index_copy_(dim, gone_index, slab)
        whole = rebuilt
    return whole


def _owns_storage(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is the only tensor on its storage and fills it contiguously: then a
    copy rebuilt from its values can stand in for it (no view or other tensor shares it)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or tensor.device.type == "meta" or not tensor.is_contiguous() \
            or tensor.storage_offset() != 0:
        return False
    storage = tensor.untyped_storage()
    if storage.nbytes() != tensor.numel() * tensor.element_size():
        return False
    return use_count(storage._cdata) <= _exclusive_use_count()


@functools.cache
def _exclusive_use_count() -> int:
    """The storage use count that ``_owns_storage`` reads for a tensor nothing else shares (its
    own reference and that of the storage object asking)."""
    alone = torch.empty(1)
    return int(torch._C._storage_Use_Count(alone.untyped_storage()._cdata))


def named_tensors(model: nn.Module, remove_duplicate: bool = True) -> dict[str, torch.Tensor]:
    """Parameters and buffers by qualified name."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=remove_duplicate))
    tensors.update(dict(model.named_buffers(remove_duplicate=remove_duplicate)))
    return tensors


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, attr)


# literal sizes -----------------------------------------------------------------------
_FACTORIES = {aten.rand: 0, aten.randn: 0}  # random values: a constant whose shape must not move


def _literal_sizes(graph: DependencyGraph, op: OpCall, removed: np.ndarray) -> list[tuple[int, int]]:
    """(old, new) pairs for integer arguments of ``op`` that encode sizes (changed or not)."""
    packet = op.func.overloadpacket
    if packet in _FACTORIES:
        sizes = op.arg(_FACTORIES[packet], "size")
        return [(v, v) for v in sizes if isinstance(v, int)] if isinstance(sizes, (list, tuple)) else []
    if packet in UNIFORM_FACTORIES and op.outputs:  # zeros(1, n_heads, q, k): follows the pruned shape
        sizes = op.arg(UNIFORM_FACTORIES[packet], "size")
        return _sized_dims(graph, op, sizes, removed)
    if packet in (aten.view, aten._unsafe_view, aten.reshape, aten.expand) and op.outputs:
        sizes = op.arg(1, "size")
        if not isinstance(sizes, (list, tuple)):
            return []
        return _sized_dims(graph, op, sizes, removed)
    if packet is aten.slice:
        source = op.inputs[0]
        dim = op.arg(1, "dim", 0)
        size = graph.trace.nodes[source].shape[dim]
        kept_before = _kept_before(graph, source, dim, removed)
        changes = []
        for value in (op.arg(2, "start"), op.arg(3, "end")):
            if isinstance(value, int) and 0 < value < size:
                changes.append((value, int(kept_before[value])))
        return changes
    if packet is aten.split and op.outputs:
        dim = op.arg(2, "dim", 0)
        old = op.arg(1, "split_size")
        new_sizes = {graph.new_shape(o, removed)[dim] for o in op.outputs[:-1]} or {graph.new_shape(op.outputs[0], removed)[dim]}
        if isinstance(old, int) and len(new_sizes) == 1:
            return [(old, next(iter(new_sizes)))]
        if len(new_sizes) > 1:
            raise _Unresolvable(op, "split into equal pieces would become unequal")
        return []
    if packet is aten.split_with_sizes and op.outputs:
        dim = op.arg(2, "dim", 0)
        olds = op.arg(1, "split_sizes")
        news = [graph.new_shape(o, removed)[dim] for o in op.outputs]
        return list(zip(olds, news))
    return []


def _sized_dims(graph: DependencyGraph, op: OpCall, sizes: Any, removed: np.ndarray) -> list[tuple[int, int]]:
    """(old, new) per literal size of the output's dims; a dim that runs along the model inputs'
    own (a sequence length) is left out: its size is the data's, not a module attribute's."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) != len(graph.trace.nodes[op.outputs[0]].shape):
        return []
    new = graph.new_shape(op.outputs[0], removed)
    return [(o, n) for d, (o, n) in enumerate(zip(sizes, new))
            if isinstance(o, int) and o != -1 and not (o == n and graph.data_sized(op.outputs[0], d))]


def _kept_before(graph: DependencyGraph, node: int, dim: int, removed: np.ndarray) -> np.ndarray:
    """kept_before[i] = number of surviving indices below i along ``dim``."""
    gone = removed[graph.labels[graph.coupling.ids(node, dim)]]
    return np.concatenate([[0], np.cumsum(~gone)])


class _Unresolvable(Exception):
    def __init__(self, op: OpCall, reason: str):
        super().__init__(f"{op.name} in module '{op.module or '<root>'}': {reason}")
        self.op = op


def _rewrite_literals(graph: DependencyGraph, ctx: SurgeryContext) -> list[OpCall]:
    """Update integer module attributes that forward uses as sizes; return ops left unmatched."""
    literal_ops = [(op, _literal_sizes(graph, op, ctx.removed)) for op in graph.trace.ops]
    # a number a module also uses as a size that did not change is ambiguous: never rewrite it
    unchanged = {(op.module, old) for op, pairs in literal_ops for old, new in pairs if old == new}
    unresolved = []
    planned: dict[tuple[int, str], int] = {}
    modules = {id(m): m for m in graph.model.modules()}
    for op, pairs in literal_ops:
        changes = [(old, new) for old, new in pairs if old != new]
        if not changes:
            continue
        module = graph.model.get_submodule(op.module) if op.module else graph.model
        matched = False
        for old, new in changes:
            if (op.module, old) in unchanged:
                continue
            for attr, value in vars(module).items():
                if type(value) is not int or value != old or attr.startswith("_") or (id(module), attr) in ctx._old:
                    continue  # handlers already set this attribute from the weights
                if planned.setdefault((id(module), attr), new) == new:  # a clash: another meaning
                    matched = True
        if not matched:
            unresolved.append(op)
    for (module_id, attr), value in planned.items():
        ctx.set(modules[module_id], attr, value)
    unresolved = [op for op in unresolved if not _solve_config_widths(graph, ctx, op)]
    _sync_products(graph.model, ctx)
    return unresolved


# integer config fields that count heads or units, which a module may read to cut a fused projection
_COUNT_FIELDS = ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "intermediate_size",
                 "n_inner", "d_ff", "ffn_dim", "moe_intermediate_size", "num_local_experts", "num_experts")


def _solve_config_widths(graph: DependencyGraph, ctx: SurgeryContext, op: OpCall) -> bool:
    """A slice of a fused projection whose bounds the module computes from its config
    (``qkv[..., : config.num_attention_heads * self.head_dim]``): the slice is ``count x unit``
    wide, ``unit`` an integer attribute of the module (a head's size) and ``count`` a config
    count field (and the module attribute of the same name) holding the old count. The field
    gets the pruned count on the module's own config copy. False when no field, or two with
    different counts, explain the slice; a wrong guess is caught by the removal's check,
    which rolls the removal back."""
    if op.func.overloadpacket is not aten.slice or not op.outputs or not op.module:
        return False
    module = graph.model.get_submodule(op.module)
    if getattr(module, "config", None) is None:
        return False
    out = op.outputs[0]
    dim = op.arg(1, "dim", 0) % len(graph.trace.nodes[out].shape)
    old, new = graph.trace.nodes[out].shape[dim], graph.new_shape(out, ctx.removed)[dim]
    units = {k: v for k, v in vars(module).items()
             if type(v) is int and v > 1 and not k.startswith("_") and k not in _COUNT_FIELDS}
    counts = {f: ctx.old(module, CONFIG_PREFIX + f) for f in _COUNT_FIELDS if has_attribute(module, CONFIG_PREFIX + f)}
    solved = {(f, name): new // unit for f, count in counts.items() for name, unit in units.items()
              if type(count) is int and count * unit == old and new % unit == 0}
    if old == new or not solved or len(set(solved.values())) != 1:
        return False
    for (field, unit_name), value in solved.items():
        if ctx.value(module, CONFIG_PREFIX + field) not in (counts[field], value):
            return False  # another slice already gave this field another count
        ctx.set(module, CONFIG_PREFIX + field, value)
        if vars(module).get(field) == counts[field] and type(vars(module)[field]) is int:
            ctx.set(module, field, value)
        ctx.touched.add((id(module), unit_name))  # the unit (a head's size) stays: no product rule may move it
    return True


def _sync_products(model: nn.Module, ctx: SurgeryContext) -> None:
    """Keep derived sizes consistent: an attribute that was the product of two others
    (``all_head_size = num_heads * head_size``) follows when either factor changed."""
    for module in model.modules():
        ints = {k: ctx.value(module, k) for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}
        changed = {k for k in ints if ctx.old(module, k) != ints[k]}
        if not changed:
            continue
        factors = [k for k in ints if ctx.old(module, k) > 1]  # x * 1 is no evidence of a product
        for target in ints:
            if target in changed or (id(module), target) in ctx.touched:
                continue
            for a in factors:
                for b in factors:
                    if a < b and {a, b} & changed and target not in (a, b) \
                            and ctx.old(module, a) * ctx.old(module, b) == ints[target]:
                        ctx.set(module, target, ints[a] * ints[b])


# per-type handlers ---------------------------------------------------------------------
@register_module_handler(nn.modules.conv._ConvNd)
def _conv(module: nn.modules.conv._ConvNd, ctx: SurgeryContext) -> None:
    w_shape = ctx.shape(module, "weight")
    groups = module.groups
    if module.transposed:
        in_channels, per_group_out = w_shape[0], w_shape[1]
        if groups > 1 and ctx.old(module, "in_channels") == groups:
            groups = in_channels
        ctx.set(module, "in_channels", in_channels)
        ctx.set(module, "out_channels", per_group_out * groups)
    else:
        out_channels, per_group_in = w_shape[0], w_shape[1]
        old_in, old_groups = ctx.old(module, "in_channels"), ctx.old(module, "groups")
        if old_groups > 1 and old_in == old_groups:  # depthwise: groups follow the channels
            multiplier = ctx.old(module, "out_channels") // old_groups
            groups = out_channels // multiplier
        ctx.set(module, "in_channels", per_group_in * groups)
        ctx.set(module, "out_channels", out_channels)
    ctx.set(module, "groups", groups)


@register_module_handler(nn.Linear)
def _linear(module: nn.Module, ctx: SurgeryContext) -> None:
    ctx.set(module, "in_features", ctx.shape(module, "weight")[1])
    ctx.set(module, "out_features", ctx.shape(module, "weight")[0])


@register_module_handler(nn.modules.batchnorm._NormBase)
def _norm_base(module: nn.Module, ctx: SurgeryContext) -> None:
    for name in ("weight", "running_mean"):
        tensor = getattr(module, name, None)
        if tensor is not None:
            ctx.set(module, "num_features", ctx.shape(module, name)[0])
            return
    shape = ctx.input_shape(module)
    if shape is not None and len(shape) > 1:
        ctx.set(module, "num_features", shape[1] if len(shape) > 2 or isinstance(module, nn.modules.batchnorm._BatchNorm) else shape[0])


@register_module_handler(nn.LayerNorm)
def _layer_norm(module: nn.LayerNorm, ctx: SurgeryContext) -> None:
    k = len(module.normalized_shape)
    if module.weight is not None:
        ctx.set(module, "normalized_shape", tuple(ctx.shape(module, "weight")))
    elif (shape := ctx.input_shape(module)) is not None:
        ctx.set(module, "normalized_shape", tuple(shape[-k:]))


if hasattr(nn, "RMSNorm"):
    register_module_handler(nn.RMSNorm)(_layer_norm)


@register_module_handler(nn.GroupNorm)
def _group_norm(module: nn.Module, ctx: SurgeryContext) -> None:
    channels = ctx.shape(module, "weight")[0] if module.weight is not None else (ctx.input_shape(module) or [0, 0])[1]
    width = ctx.old(module, "num_channels") // ctx.old(module, "num_groups")
    ctx.set(module, "num_channels", channels)
    ctx.set(module, "num_groups", channels // width)


@register_module_handler(nn.Embedding)
def _embedding(module: nn.Module, ctx: SurgeryContext) -> None:
    ctx.set(module, "embedding_dim", ctx.shape(module, "weight")[1])


@register_module_handler(nn.PReLU)
def _prelu(module: nn.Module, ctx: SurgeryContext) -> None:
    ctx.set(module, "num_parameters", ctx.shape(module, "weight")[0])


@register_module_handler(nn.RNNBase)
def _recurrent(module: nn.RNNBase, ctx: SurgeryContext) -> None:
    """LSTM/GRU/RNN sizes from layer 0's weights (all layers and directions share them); the
    module's cached ``_flat_weights`` refresh themselves on the next forward."""
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    ctx.set(module, "input_size", ctx.shape(module, "weight_ih_l0")[1])
    ctx.set(module, "hidden_size", ctx.shape(module, "weight_ih_l0")[0] // gates)
    ctx.set(module, "proj_size", ctx.shape(module, "weight_hr_l0")[0] if module.proj_size else 0)


@register_module_handler(nn.MultiheadAttention)
def _mha(module: nn.MultiheadAttention, ctx: SurgeryContext) -> None:
    if module.in_proj_weight is None:
        raise RuntimeError("nn.MultiheadAttention with separate q/k/v projections is not supported")
    embed = ctx.shape(module, "in_proj_weight")[1]
    ctx.set(module, "embed_dim", embed)
    ctx.set(module, "kdim", embed)
    ctx.set(module, "vdim", embed)
    ctx.set(module, "head_dim", embed // module.num_heads)


def _register_transformers_handlers() -> None:
    """HF's GPT-2 style Conv1D stores its weight transposed ([in, out]) with nx/nf sizes."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001 - transformers is optional; a broken install must not stop pruning
        return
    if Conv1D in _HANDLERS:
        return

    @register_module_handler(Conv1D)
    def _hf_conv1d(module: nn.Module, ctx: SurgeryContext) -> None:
        ctx.set(module, "nx", ctx.shape(module, "weight")[0])
        ctx.set(module, "nf", ctx.shape(module, "weight")[1])

