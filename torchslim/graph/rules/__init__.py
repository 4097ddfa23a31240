"""Channel-coupling rules per aten op; importing this package registers them all."""
from torchslim.graph.rules import (  # noqa: F401
    attention, conv, factory, indexing, matmul, norm, pointwise, recurrent, reduce, shape, spatial,
)
from torchslim.graph.rules._registry import OpRule, is_pointwise, op_rule, rule_for

__all__ = ["OpRule", "is_pointwise", "op_rule", "rule_for"]
