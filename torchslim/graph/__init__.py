"""One dependency graph over the traced model serves every feature (pruning, criteria, MACs)."""
from torchslim.graph._coupling import Coupling, connected_components
# shared with other subpackages (MACs formulas, module naming, recorded op calls):
from torchslim.graph._formulas import CUSTOM_MAPPING
from torchslim.graph._trace import OpCall, module_aliases, module_names
from torchslim.graph._trace import Trace, trace
from torchslim.graph.conv_args import ConvArgs, conv_args
from torchslim.graph.dependency import DependencyGraph, Group, OpBlocker, register_module_rule
from torchslim.graph.rules import op_rule

__all__ = ["CUSTOM_MAPPING", "ConvArgs", "conv_args", "Coupling", "connected_components", "DependencyGraph", "Group", "OpBlocker", "OpCall", "Trace", "op_rule", "register_module_rule", "module_aliases", "module_names", "trace"]
