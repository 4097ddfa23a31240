"""Structured pruning with physical removal: config, criteria, plan, surgery, verification."""
from torchslim.pruning._surgery import register_module_handler
from torchslim.pruning.config import PruneConfig
from torchslim.pruning.plan import PlanStep, PruningPlan
from torchslim.pruning.prune import PruneResult, PruningError, prune_
from torchslim.pruning.verify import VerifyReport, verify, zero_removed_

__all__ = [
    "PlanStep", "PruneConfig", "PruneResult", "PruningError", "PruningPlan",
    "VerifyReport", "prune_", "register_module_handler", "verify", "zero_removed_",
]
