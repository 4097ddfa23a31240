"""Registry of channel-coupling rules, one per aten op (or op family).

A rule reads one recorded :class:`OpCall` and declares on the :class:`Coupling` which
indices of its inputs and outputs correspond. Ops without a rule fall back to the
pointwise rule when aten tags them pointwise, else every dimension they touch is pinned
(never pruned) and the op is reported, so an unknown op can make pruning conservative
but never wrong.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from torchslim._registry import Registry
from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import NodeRef, OpCall, Trace

OpRule = Callable[[Coupling, OpCall, Trace], None]
_RULES: Registry[Any, OpRule] = Registry("op rule")


def op_rule(*ops: Any, replace: bool = False) -> Callable[[OpRule], OpRule]:
    """Register ``fn`` as the rule for aten ops (packets like ``aten.view`` or single overloads).

    An op that already has a rule is refused (``ValueError`` naming it) unless ``replace=True``.
    """

    def register(fn: OpRule) -> OpRule:
        if not replace:  # refuse before registering any op, so a refused call changes nothing
            for op in ops:
                if op in _RULES:
                    _RULES.register(op, fn)  # raises the registry's error naming the op
        for op in ops:
            _RULES.register(op, fn, replace=replace)
        return fn

    return register


def rule_for(func: Any) -> OpRule | None:
    """The op's rule; an in-place variant (``hardswish_``) without one uses its functional op's."""
    rule = _RULES.get(func)
    if rule is None:
        rule = _RULES.get(getattr(func, "overloadpacket", None))
    functional = _functional_of(func)
    if rule is None and functional is not None:
        rule = _RULES.get(functional) or _RULES.get(functional.overloadpacket)
    return rule


def is_pointwise(func: Any) -> bool:
    """aten's pointwise tag; in-place variants inherit their functional op's."""
    functional = _functional_of(func)
    return torch.Tag.pointwise in getattr(func, "tags", ()) or (
        functional is not None and torch.Tag.pointwise in getattr(functional, "tags", ()))


def _functional_of(func: Any) -> Any:
    """``aten.hardswish.default`` for ``aten.hardswish_.default`` (same overload), else None."""
    if torch.Tag.inplace not in getattr(func, "tags", ()):
        return None
    name = func.overloadpacket.__name__
    packet = getattr(torch.ops.aten, name[:-1], None) if name.endswith("_") else None
    return getattr(packet, func._overloadname, None) if packet is not None else None


def node_arg(op: OpCall, position: int, keyword: str) -> int | None:
    """Node index of a tensor argument, or None when absent."""
    value = op.arg(position, keyword)
    return value.node if isinstance(value, NodeRef) and value.node >= 0 else None


def tensor_arg(op: OpCall, position: int, keyword: str) -> int:
    """Node index of a tensor argument the rule needs; without it the rule fails and the op is pinned."""
    node = node_arg(op, position, keyword)
    if node is None:
        raise ValueError(f"{op.name}: argument {keyword!r} is not a traced tensor")
    return node


def node_list_arg(op: OpCall, position: int, keyword: str) -> list[int]:
    values = op.arg(position, keyword) or []
    return [v.node for v in values if isinstance(v, NodeRef)]


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def align_broadcast(c: Coupling, source: int, target: int) -> None:
    """Couple ``source`` to ``target`` under broadcasting (right-aligned, equal sizes only)."""
    src, dst = c.shape(source), c.shape(target)
    shift = len(dst) - len(src)
    for d in range(len(src)):
        td = d + shift
        if td >= 0 and src[d] == dst[td] and src[d] > 1:
            c.same(source, d, target, td)
