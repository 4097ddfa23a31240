"""Structured pruning with physical removal: config, criteria, plan, surgery, verification,
recorded module replacements (``replace_module_``) for structural rewrites, depth pruning
(``prune_depth_``: whole blocks dropped) and whole-expert removal for mixture-of-experts layers
(``prune_experts_``)."""
from torchslim.pruning._surgery import register_module_handler
from torchslim.pruning.config import PruneConfig
from torchslim.pruning.depth import DepthResult, block_importance, drop_blocks_, droppable_blocks, prune_depth_
from torchslim.pruning.plan import PlanStep, PruningPlan
from torchslim.pruning.selector import PruningError
from torchslim.pruning.apply import RemovalPlan, applied, apply_plan, channel_order, plan_removal, renumbered_index
from torchslim.pruning.permute import ChannelSort, permute_, sort_channels_, sorted_order
from torchslim.pruning.prune import InexactPruningWarning, PruneResult, prune_, remove_
from torchslim.pruning.experts import MoELayer, moe_layers, prune_experts_, routing_frequency
from torchslim.pruning.recipe import config_from_recipe, load_recipe
from torchslim.pruning.replace import (build_replacement, register_replacement_type, replace_module_,
                                       replace_modules_, replacement_types)
from torchslim.pruning.verify import VerifyReport, verify, zero_removed_

# Shared with torchslim.io and torchslim.schedules (not user API): surgery that replays a saved
# plan, the group filters and keep counts, and the HF-config / optimizer-state bookkeeping.
from torchslim.pruning._hf_config import hf_config_of as hf_config_of, sync_hf_config as sync_hf_config
from torchslim.pruning._optimizer_state import remember_former_shapes as remember_former_shapes
from torchslim.pruning.selector import eligible_groups as eligible_groups, keep_count as keep_count
from torchslim.pruning._surgery import (Transaction as Transaction, get_attribute as get_attribute,
                                        has_attribute as has_attribute, get_tensor as get_tensor,
                                        named_tensors as named_tensors, slice_to_kept as slice_to_kept)

__all__ = [
    "ChannelSort", "DepthResult", "block_importance", "drop_blocks_", "droppable_blocks", "prune_depth_", "InexactPruningWarning", "MoELayer", "PlanStep", "PruneConfig", "RemovalPlan", "applied", "apply_plan", "channel_order", "plan_removal", "renumbered_index", "PruneResult", "PruningError", "PruningPlan",
    "VerifyReport", "build_replacement", "config_from_recipe", "load_recipe", "moe_layers", "prune_", "prune_experts_", "register_module_handler",
    "permute_", "register_replacement_type", "remove_", "replace_module_", "replace_modules_", "replacement_types", "routing_frequency", "sort_channels_", "sorted_order", "verify",
    "zero_removed_",
]
