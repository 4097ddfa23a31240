"""Structured pruning with physical removal: config, criteria, plan, surgery, verification."""
from torchslim.pruning._surgery import register_module_handler
from torchslim.pruning.config import PruneConfig
from torchslim.pruning.importance import Importance, NormImportance, RandomImportance
from torchslim.pruning.plan import PlanStep, PruningPlan
from torchslim.pruning.prune import PruneResult, PruningError, prune_
from torchslim.pruning.verify import VerifyReport, verify, zero_removed_

__all__ = [
    "Importance", "NormImportance", "PlanStep", "PruneConfig", "PruneResult", "PruningError", "PruningPlan",
    "RandomImportance", "VerifyReport", "prune_", "register_module_handler", "verify", "zero_removed_",
]
