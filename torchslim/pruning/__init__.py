"""Structured pruning with physical removal: config, criteria, plan, surgery, verification."""
from torchslim.pruning._surgery import register_module_handler
from torchslim.pruning.config import PruneConfig
from torchslim.pruning.plan import PlanStep, PruningPlan
from torchslim.pruning._select import PruningError
from torchslim.pruning.apply import RemovalPlan, applied, apply_plan, channel_order, plan_removal
from torchslim.pruning.prune import PruneResult, prune_
from torchslim.pruning.recipe import config_from_recipe, load_recipe
from torchslim.pruning.verify import VerifyReport, verify, zero_removed_

__all__ = [
    "PlanStep", "PruneConfig", "RemovalPlan", "applied", "apply_plan", "channel_order", "plan_removal", "PruneResult", "PruningError", "PruningPlan",
    "VerifyReport", "config_from_recipe", "load_recipe", "prune_", "register_module_handler", "verify", "zero_removed_",
]
