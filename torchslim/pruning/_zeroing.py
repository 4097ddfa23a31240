"""The zeroed original, one module call at a time: the reference a removal is checked against
(the model with the removed slices zeroed) without a second copy of the weights.

Zeroing every removed slice at once needs their values kept aside to restore them: as much
memory as the removal itself, half a model when half of it goes. Here a tensor is zeroed
only while a module call that uses it runs (the modules whose traced ops read it, or read a
weight-only tensor computed from it, such as ``weight.t()``; the whole forward for a tensor
used at the top level) and restored, bit for bit, when the last such call returns. What is
kept aside at any time belongs to the layers running (their removed rows, or the weights
losing columns), not to the model.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from torchslim.graph import DependencyGraph
from torchslim.pruning._surgery import named_tensors

ROOT = ""


def scopes_of(graph: DependencyGraph, names: list[str]) -> dict[str, set[str]]:
    """Per tensor name: the modules (canonical names; ``""`` the whole forward) during whose
    calls it must read as zeroed: those issuing a traced op that reads it, or reads a tensor
    computed from it and from no input (a transposed or sliced weight; a view of it reads
    the weight wherever it is used)."""
    trace = graph.trace
    consumers: dict[int, list] = {}
    for op in trace.ops:
        for node in op.inputs:
            consumers.setdefault(node, []).append(op)
    dependent, outputs = trace.input_dependent, set(trace.output_nodes)
    scopes: dict[str, set[str]] = {}
    for name in names:
        start = trace.param_nodes.get(name)
        modules: set[str] = set()
        frontier = [] if start is None else [start]
        seen = set(frontier)
        while frontier:
            node = frontier.pop()
            if node in outputs:  # the model returns it (or what is computed from it alone)
                modules.add(ROOT)
            for op in consumers.get(node, ()):
                modules.add(op.module)
                fresh = [o for o in op.outputs if o not in dependent and o not in seen]
                seen.update(fresh)
                frontier.extend(fresh)
        scopes[name] = {ROOT} if ROOT in modules or not modules else modules
    return scopes


@contextlib.contextmanager
def zeroed_while_used(graph: DependencyGraph, removal: dict[str, dict]) -> Iterator[None]:
    """Inside the block, every forward of ``graph.model`` sees the slices ``removal`` names
    (tensor -> dim -> indices) as zeros; each tensor holds its real values again between the
    calls that read it and after the block, bit for bit."""
    model = graph.model
    tensors = named_tensors(model)
    scopes = scopes_of(graph, list(removal))
    found: dict[str, nn.Module] = {}
    for label in {label for labels in scopes.values() for label in labels} - {ROOT}:
        try:
            found[label] = model.get_submodule(label)
        except AttributeError:  # a module outside the model's tree (made in forward): no hook to hang
            continue
    by_module: dict[str, list[str]] = {}
    for name, labels in scopes.items():
        for label in labels if labels <= found.keys() | {ROOT} else {ROOT}:
            by_module.setdefault(label, []).append(name)
    depth = dict.fromkeys(removal, 0)
    saved: dict[str, _Saved] = {}

    def enter(names: list[str]) -> None:
        with torch.no_grad():
            for name in names:
                depth[name] += 1
                if depth[name] == 1:
                    saved[name] = _zero(tensors[name], removal[name])

    def leave(names: list[str]) -> None:
        with torch.no_grad():
            for name in names:
                depth[name] -= 1
                if depth[name] == 0:
                    _restore(tensors[name], saved.pop(name))

    handles = []
    for label, names in by_module.items():
        if label == ROOT:
            continue
        module = found[label]
        handles.append(module.register_forward_pre_hook(_hook(enter, names)))
        handles.append(module.register_forward_hook(_hook(leave, names)))
    try:
        enter(by_module.get(ROOT, []))
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():  # a forward that raised left its modules' tensors zeroed
            for name, slabs in saved.items():
                _restore(tensors[name], slabs)
        saved.clear()


def _hook(action: Callable[[list[str]], None], names: list[str]) -> Callable[..., None]:
    def hook(module: nn.Module, *args: object) -> None:
        action(names)
    return hook


# what zeroing a tensor set aside: per dim (None: the whole tensor) the indices and their values
_Saved = list[tuple[int | None, torch.Tensor | None, torch.Tensor]]


def _zero(tensor: torch.Tensor, removed: dict) -> _Saved:
    """Zero the removed slices of ``tensor`` in place and return what restores it. Rows (dim 0)
    are copied out and back by index; a tensor losing slices of a later dim is copied whole
    and zeroed through a broadcast mask (gathering strided columns is several times slower
    than copying the tensor)."""
    if set(removed) == {0}:
        index = torch.as_tensor(removed[0], dtype=torch.long, device=tensor.device)
        slab = tensor.index_select(0, index)
        tensor.index_fill_(0, index, 0)
        return [(0, index, slab)]
    whole = tensor.clone()
    for dim, gone in removed.items():
        shape = [1] * tensor.ndim
        shape[dim] = tensor.shape[dim]
        mask = torch.zeros(tensor.shape[dim], dtype=torch.bool, device=tensor.device)
        mask[torch.as_tensor(gone, dtype=torch.long, device=tensor.device)] = True
        tensor.masked_fill_(mask.view(shape), 0)
    return [(None, None, whole)]


def _restore(tensor: torch.Tensor, saved: _Saved) -> None:
    """Put back what ``_zero`` set aside, bit for bit."""
    for dim, index, values in reversed(saved):
        if dim is None:
            tensor.copy_(values)
        else:
            assert index is not None
            tensor.index_copy_(dim, index, values)
