"""One dependency graph over the traced model serves every feature (pruning, criteria, MACs)."""
from torchslim.graph._coupling import Coupling
from torchslim.graph._trace import Trace, trace
from torchslim.graph.dependency import DependencyGraph, Group, OpBlocker, register_module_rule
from torchslim.graph.rules import op_rule

__all__ = ["Coupling", "DependencyGraph", "Group", "OpBlocker", "Trace", "op_rule", "register_module_rule", "trace"]
