"""Importance criteria, one per file; ``make_importance(name)`` is the front door.

Every criterion returns one score per atom of a group (higher = keep); see ``_base`` for
how per-slot values reduce to atoms. Data-driven ones (taylor, fisher, apoz, mean_activation)
measure the model on ``data=`` batches passed to ``prune_`` first.
"""
from __future__ import annotations

from typing import Any, Callable

from torchslim.criteria._base import DataDriven, Importance, scatter_to_atoms
from torchslim.criteria.activation import ActivationImportance
from torchslim.criteria.bn_scale import BNScaleImportance, bn_l1_penalty
from torchslim.criteria.fisher import FisherImportance, random_projection_loss
from torchslim.criteria.fpgm import FPGMImportance
from torchslim.criteria.lamp import LAMPImportance
from torchslim.criteria.norm import NormImportance
from torchslim.criteria.random import RandomImportance
from torchslim.criteria.taylor import TaylorImportance

CRITERIA: dict[str, Callable[[int], Importance]] = {
    "l1": lambda seed: NormImportance(1),
    "l2": lambda seed: NormImportance(2),
    "fpgm": lambda seed: FPGMImportance(),
    "bn_scale": lambda seed: BNScaleImportance(),
    "lamp": lambda seed: LAMPImportance(),
    "taylor": lambda seed: TaylorImportance(),
    "fisher": lambda seed: FisherImportance(),
    "apoz": lambda seed: ActivationImportance("apoz"),
    "mean_activation": lambda seed: ActivationImportance("mean"),
    "random": lambda seed: RandomImportance(seed),
}


def make_importance(criterion: Any, seed: int = 0) -> Importance:
    """A criterion object from a name in ``CRITERIA`` or a callable ``(graph, group) -> scores``."""
    if isinstance(criterion, str):
        if criterion not in CRITERIA:
            raise ValueError(f"PruneConfig.criterion {criterion!r} is unknown; choose one of {sorted(CRITERIA)}")
        return CRITERIA[criterion](seed)
    if callable(criterion):
        return criterion
    raise ValueError(f"PruneConfig.criterion must be a name or a callable, got {type(criterion).__name__}")


__all__ = [
    "ActivationImportance", "BNScaleImportance", "CRITERIA", "DataDriven", "FisherImportance", "FPGMImportance",
    "Importance", "LAMPImportance", "NormImportance", "RandomImportance", "TaylorImportance", "bn_l1_penalty",
    "make_importance", "random_projection_loss", "scatter_to_atoms",
]
