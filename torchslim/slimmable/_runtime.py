"""Running a model at a width without copying it: for the duration of the model's forward, its
sliced tensors are views of the full ones (a gather where the kept channels are not one range)
and its modules' attributes take the values the engine plans for that removal.

The slices are taken from the full parameters inside autograd, so a backward pass at any width
reaches exactly the kept entries of the shared weights; outside a forward the model holds its
full tensors and attributes (``parameters()``, ``state_dict()`` and optimizers see the full
model). BatchNorm statistics updated in training land in the full buffers (in place through a
view, written back after a gather).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torchslim.pruning import RemovalPlan, named_tensors


@dataclasses.dataclass
class _ModuleWidth:
    """What one module swaps in at a width: tensor attr -> kept indices per dim, replacement
    values (renumbered index buffers, private BatchNorm tensors) and attribute values."""

    kept: dict[str, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)
    values: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)


class WidthRuntime:
    """Hooks on ``model`` that put a planned removal in place for each of its forward passes.

    The swap happens at the model's own forward (not per submodule), so tensors a module reads
    from a child it never calls (``nn.MultiheadAttention`` reads ``out_proj.weight``) are sliced
    too; calling a submodule on its own runs it at full width."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self._holders = _holders(model)
        self._active: dict[nn.Module, _ModuleWidth] = {}
        # a stack (the model may run inside itself): (tensor store or None for an attribute,
        # module, name, the full value, the kept indices it was sliced to)
        self._saved: list[list[tuple[dict | None, nn.Module, str, Any, dict[int, np.ndarray] | None]]] = []
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def activate(self, plan: RemovalPlan | None, values: dict[str, torch.Tensor] | None = None) -> None:
        """Run every following forward with ``plan`` applied (None: the full model), and with
        ``values`` (tensor name -> tensor) standing in for those tensors."""
        active: dict[nn.Module, _ModuleWidth] = {}
        for name, dims in (plan.kept if plan is not None else {}).items():
            for module, attr in self._holders.get(name, []):
                active.setdefault(module, _ModuleWidth()).kept[attr] = dims
        for name, value in {**(plan.renumbered if plan is not None else {}), **(values or {})}.items():
            for module, attr in self._holders.get(name, []):
                width = active.setdefault(module, _ModuleWidth())
                width.kept.pop(attr, None)
                width.values[attr] = value
        for label, attrs in (plan.attributes if plan is not None else {}).items():
            active.setdefault(self.modules[label], _ModuleWidth()).attributes.update(attrs)
        self._active = active

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = {}

    # hooks ----------------------------------------------------------------------------------
    def _enter(self, model: nn.Module, args: Any) -> None:
        saved: list[tuple[dict | None, nn.Module, str, Any, dict[int, np.ndarray] | None]] = []
        for module, width in self._active.items():
            for attr, dims in width.kept.items():
                store = _store(module, attr)
                saved.append((store, module, attr, store[attr], dims))
                store[attr] = _sliced(store[attr], dims)
            for attr, value in width.values.items():
                store = _store(module, attr)
                saved.append((store, module, attr, store[attr], None))
                store[attr] = value
            for attr, value in width.attributes.items():
                saved.append((None, module, attr, getattr(module, attr), None))
                setattr(module, attr, value)
        self._saved.append(saved)

    def _exit(self, model: nn.Module, args: Any, output: Any) -> None:
        if not self._saved:
            return
        for store, module, attr, full, dims in reversed(self._saved.pop()):
            if store is None:  # a module attribute
                setattr(module, attr, full)
                continue
            if dims is not None and store is module._buffers and module.training:
                _write_back(full, store[attr], dims)
            store[attr] = full


def _store(module: nn.Module, attr: str) -> dict[str, Any]:
    """The dict ``attr`` is registered in (parameters or buffers); plain tensors go there too."""
    return module._parameters if attr in module._parameters else module._buffers


def _holders(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Tensor name (as the engine names it: the first of tied names) -> every (module, attr)
    that holds it."""
    first = {id(t): name for name, t in named_tensors(model).items()}
    holders: dict[str, list[tuple[nn.Module, str]]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and id(tensor) in first:
                holders.setdefault(first[id(tensor)], []).append((module, attr))
    return holders


def _sliced(full: torch.Tensor, dims: dict[int, np.ndarray]) -> torch.Tensor:
    """``full`` with only the kept indices of each dim: a view where they form one range."""
    out = full
    for dim, keep in dims.items():
        if keep.size and np.array_equal(keep, np.arange(keep[0], keep[0] + keep.size)):
            out = out.narrow(dim, int(keep[0]), int(keep.size))
        else:
            out = out.index_select(dim, torch.as_tensor(keep, dtype=torch.long, device=full.device))
    return out


def _write_back(full: torch.Tensor, sliced: torch.Tensor, dims: dict[int, np.ndarray]) -> None:
    """Copy a gathered buffer slice (e.g. running statistics updated in training) into ``full``."""
    shares = sliced.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    if shares or not full.is_floating_point() or len(dims) != 1:
        return  # a view already wrote in place; counters and multi-dim gathers are not statistics
    (dim, keep), = dims.items()
    with torch.no_grad():
        full.index_copy_(dim, torch.as_tensor(keep, dtype=torch.long, device=full.device), sliced)
