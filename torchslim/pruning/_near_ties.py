"""Exactness through data-dependent selections (top-k, sort, NMS, score thresholds).

Detection heads pick boxes with ``topk``, ``sort``, thresholds and NMS. A pruned model sums
its channels in another order, so its scores differ from the zeroed original's in the last
bits, and where two scores (nearly) tie the selection can pick differently: the final boxes
then differ although every value before the selection matched. That is not a pruning error.

The check records, in call order, the inputs and outputs of every selection op in both
runs. Outputs that differ are accepted only if the *first* selection whose outputs differ
received matching inputs (within tolerance): everything up to it was exact, and it broke a
near-tie. Any earlier mismatch is still a failure.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

_SELECTING = {aten.topk, aten.sort, aten.argmax, aten.argmin, aten.nonzero, aten.masked_select, aten.kthvalue,
              aten.gt, aten.lt, aten.ge, aten.le}
_SELECTING_OVERLOADS = {"dim"}  # aten.max.dim / aten.min.dim return indices; max.default does not


def _is_selection(func) -> bool:
    packet = func.overloadpacket
    if packet in _SELECTING:
        return True
    if packet in (aten.max, aten.min) and func._overloadname in _SELECTING_OVERLOADS:
        return True
    return getattr(packet, "__name__", "") == "nms" and "torchvision" in str(func)


@dataclasses.dataclass
class Selection:
    name: str
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


class SelectionRecorder(TorchDispatchMode):
    """Records every selection op's tensor inputs and outputs (cloned), in call order."""

    def __init__(self):
        super().__init__()
        self.selections: list[Selection] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _is_selection(func):
            self.selections.append(Selection(str(func), _tensors((args, kwargs)), _tensors(out)))
        return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def near_tie_explains(expected: list[Selection], actual: list[Selection], atol: float, rtol: float) -> str | None:
    """Why differing outputs are still exact (the first diverging selection got matching
    inputs), or None when no selection explains the difference."""
    from torchslim.pruning.verify import compare_outputs

    for index, (e, a) in enumerate(zip(expected, actual)):
        if e.name != a.name or not compare_outputs(e.inputs, a.inputs, atol, rtol).ok:
            return None  # a value before any tie already differs
        if _same(e.outputs, a.outputs):
            continue
        return (f"outputs differ only after {e.name} (selection {index + 1} of {len(expected)}) broke a near-tie; "
                "every value it selected from matches")
    return None


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
