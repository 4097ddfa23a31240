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

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torchslim.pruning import RemovalPlan, named_tensors


# how one dim of a tensor is cut: (dim, start, length) for a range (a view), or (dim, index) for a gather
Cut = tuple[int, int, int] | tuple[int, torch.Tensor]


class WidthRuntime:
    """Hooks on ``model`` that put a planned removal in place for each of its forward passes.

    The swap happens at the model's own forward (not per submodule), so tensors a module reads
    from a child it never calls (``nn.MultiheadAttention`` reads ``out_proj.weight``) are sliced
    too; calling a submodule on its own runs it at full width. :meth:`activate` compiles the plan
    into a flat list of swaps, so a forward pays a few microseconds per sliced tensor."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self._holders = _holders(model)
        # (store, module, name, cuts) per sliced tensor; (store, name, value) per replaced one;
        # (module, name, value) per attribute
        self._slices: list[tuple[dict, nn.Module, str, tuple[Cut, ...]]] = []
        self._values: list[tuple[dict, str, torch.Tensor]] = []
        self._attributes: list[tuple[nn.Module, str, Any]] = []
        # without autograd, each parameter's cut is copied once per width: id -> (tensor, version, cut)
        self._cache: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        # a stack (the model may run inside itself) of what each forward swapped out
        self._saved: list[tuple[list, list, list]] = []
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def activate(self, plan: RemovalPlan | None, values: dict[str, torch.Tensor] | None = None) -> None:
        """Run every following forward with ``plan`` applied (None: the full model), and with
        ``values`` (tensor name -> tensor) standing in for those tensors."""
        replaced = {**(plan.renumbered if plan is not None else {}), **(values or {})}
        slices, swaps, attributes = [], [], []
        for name, dims in (plan.kept if plan is not None else {}).items():
            if name in replaced:
                continue
            for module, attr in self._holders.get(name, []):
                store = _store(module, attr)
                slices.append((store, module, attr, _cuts(dims, store[attr])))
        for name, value in replaced.items():
            for module, attr in self._holders.get(name, []):
                swaps.append((_store(module, attr), attr, value))
        for label, attrs in (plan.attributes if plan is not None else {}).items():
            attributes += [(self.modules[label], attr, value) for attr, value in attrs.items()]
        self._slices, self._values, self._attributes = slices, swaps, attributes
        self._cache.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.activate(None)

    # hooks ----------------------------------------------------------------------------------
    def _enter(self, model: nn.Module, args: Any) -> None:
        tensors, values, attributes = [], [], []
        reuse = not torch.is_grad_enabled()  # no autograd graph to build: contiguous copies, made once
        for store, module, attr, cuts in self._slices:
            full = store[attr]
            if reuse and store is module._parameters:
                part = self._cached(full, cuts)
            else:
                part = _cut(full, cuts)
            tensors.append((store, module, attr, full, cuts))
            store[attr] = part
        for store, attr, value in self._values:
            values.append((store, attr, store[attr]))
            store[attr] = value
        for module, attr, value in self._attributes:
            attributes.append((module, attr, getattr(module, attr)))
            _set(module, attr, value)
        self._saved.append((tensors, values, attributes))

    def _cached(self, full: torch.Tensor, cuts: tuple[Cut, ...]) -> torch.Tensor:
        """The cut of a parameter as a contiguous copy, remade when the parameter changed
        (its version counter moves with every in-place update, e.g. an optimizer step)."""
        hit = self._cache.get(id(full))
        if hit is not None and hit[0] is full and hit[1] == full._version:
            return hit[2]
        part = _cut(full, cuts).contiguous()
        self._cache[id(full)] = (full, full._version, part)
        return part

    def _exit(self, model: nn.Module, args: Any, output: Any) -> None:
        if not self._saved:
            return
        tensors, values, attributes = self._saved.pop()
        for module, attr, old in reversed(attributes):
            _set(module, attr, old)
        for store, attr, old in reversed(values):
            store[attr] = old
        for store, module, attr, full, cuts in reversed(tensors):
            if store is module._buffers and module.training:
                _write_back(full, store[attr], cuts)
            store[attr] = full


def _cut(full: torch.Tensor, cuts: tuple[Cut, ...]) -> torch.Tensor:
    part = full
    for cut in cuts:
        part = part.narrow(*cut) if len(cut) == 3 else part.index_select(cut[0], cut[1])
    return part


def _set(module: nn.Module, attr: str, value: Any) -> None:
    """``setattr`` without ``nn.Module.__setattr__``'s checks for plain attributes (channels, sizes)."""
    if attr in module.__dict__:
        module.__dict__[attr] = value
    else:
        setattr(module, attr, value)


def _cuts(dims: dict[int, np.ndarray], tensor: torch.Tensor) -> tuple[Cut, ...]:
    """The kept indices of each dim as a view where they form one range, else a gather."""
    cuts: list[Cut] = []
    for dim, keep in sorted(dims.items()):
        if keep.size and np.array_equal(keep, np.arange(keep[0], keep[0] + keep.size)):
            cuts.append((dim, int(keep[0]), int(keep.size)))
        else:
            cuts.append((dim, torch.as_tensor(keep, dtype=torch.long, device=tensor.device)))
    return tuple(cuts)


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


def _write_back(full: torch.Tensor, part: torch.Tensor, cuts: tuple[Cut, ...]) -> None:
    """Copy a gathered buffer slice (running statistics updated in training) into ``full``."""
    if len(cuts) != 1 or len(cuts[0]) == 3 or not full.is_floating_point():
        return  # a view already wrote in place; counters and multi-dim gathers are not statistics
    dim, index = cuts[0]
    with torch.no_grad():
        full.index_copy_(dim, index, part)
