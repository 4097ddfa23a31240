"""Per-module MACs of one forward pass, counted by :func:`torchslim.graph.macs.live_counter`.

The counting convention (1 MAC = 2 FLOPs; torch's formulas plus a shared table for what torch
does not count; memory-bound ops 0; ``nn.MultiheadAttention`` with its fused fast path
disabled) lives in :mod:`torchslim.graph.macs`, the one MAC counter that the pruner's graph
estimates use too. This module only attributes the counted MACs to modules.

Attribution: every op's MACs go to the innermost module whose forward was running (its
``self_macs``); a module's ``macs`` is its ``self_macs`` plus its submodules' (by qualified
name). FlopCounterMode's own per-module table counts by call nesting instead (a module that
another module calls, like MODNet's backbone inside ``lr_branch``, counts in both); it is
kept as ``MacProfile.by_call`` for comparison.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchslim._inputs import ExampleInputs, call_model, iter_tensors
from torchslim.graph.macs import fastpath_disabled, live_counter


@dataclasses.dataclass
class ModuleCalls:
    """What one module did during the counted forward pass (all its calls)."""

    self_macs: int = 0
    calls: int = 0
    output_shape: list[list[int]] = dataclasses.field(default_factory=list)
    activation_bytes: int = 0


@dataclasses.dataclass
class MacProfile:
    total: int                      # MACs of the whole forward pass (FlopCounterMode's Global / 2)
    modules: dict[str, ModuleCalls]  # by qualified name; modules that never ran are absent
    by_op: dict[str, int]           # MACs per aten op
    by_call: dict[str, int]         # FlopCounterMode's per-module counts (call nesting) / 2


def _tracker_names(counter: FlopCounterMode, model: nn.Module) -> dict[str, str]:
    """FlopCounterMode's module names ('Model.a.b') -> qualified names ('a.b')."""
    canonical = {id(m): name for name, m in model.named_modules()}
    known = getattr(getattr(counter, "mod_tracker", None), "_known_modules", None)
    mapping: dict[str, str] = {}
    if known is not None:
        for module, tracker_name in list(known.items()):
            if id(module) in canonical:
                mapping[tracker_name] = canonical[id(module)]
        return mapping
    root = type(model).__name__  # fallback: the tracker's naming scheme from the root down
    mapping[root] = ""
    for name, _ in model.named_modules(remove_duplicate=False):
        if name:
            mapping[f"{root}.{name}"] = name
    return mapping


def profile_macs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[MacProfile, Any]:
    """Run ``model`` once under FlopCounterMode; return the per-module MACs and the output.

    The caller chooses grad mode and training flags; this function adds nothing but the
    counter, two global module hooks (removed on exit) and the disabled MHA fast path.
    """
    names = {id(m): name for name, m in model.named_modules()}
    modules: dict[str, ModuleCalls] = defaultdict(ModuleCalls)
    counter = live_counter()
    # frames: [module id, qualified name, FLOPs at entry, FLOPs inside child module calls]
    stack: list[list] = []

    def pre_hook(module, args):
        name = names.get(id(module))
        if name is not None:
            stack.append([id(module), name, counter.get_total_flops(), 0])

    def post_hook(module, args, output):
        if names.get(id(module)) is None or not any(f[0] == id(module) for f in stack):
            return
        now = counter.get_total_flops()
        while stack:
            frame = stack.pop()
            inclusive = now - frame[2]
            record = modules[frame[1]]
            record.self_macs += inclusive - frame[3]
            if stack:
                stack[-1][3] += inclusive
            if frame[0] == id(module):
                break
        record.calls += 1
        tensors = list(iter_tensors(output))
        if record.calls == 1:
            record.output_shape = [list(t.shape) for t in tensors]
        record.activation_bytes += sum(t.numel() * t.element_size() for t in tensors)

    pre = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    post = torch.nn.modules.module.register_module_forward_hook(post_hook)
    try:
        with fastpath_disabled(), counter:
            output = call_model(model, example_inputs)
    finally:
        pre.remove()
        post.remove()
    total_flops = counter.get_total_flops()
    attributed = sum(r.self_macs for r in modules.values())
    if total_flops != attributed:  # ops outside any module call (e.g. in the root's forward hooks)
        modules[""].self_macs += total_flops - attributed
    for record in modules.values():
        record.self_macs //= 2
    counts = counter.get_flop_counts()
    tracker = _tracker_names(counter, model)
    by_call = {tracker[k]: sum(v.values()) // 2 for k, v in counts.items() if k in tracker}
    by_op = {str(op): flops // 2 for op, flops in counts.get("Global", {}).items()}
    return MacProfile(total=total_flops // 2, modules=dict(modules), by_op=by_op, by_call=by_call), output
