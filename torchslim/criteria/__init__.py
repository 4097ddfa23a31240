"""Importance criteria, one per file; ``make_importance(name)`` is the front door.

Every criterion returns one score per atom of a group (higher = keep); see ``_base`` for
how per-slot values reduce to atoms. Data-driven ones (taylor, fisher, apoz, mean_activation, thinet)
measure the model on ``data=`` batches passed to ``prune_`` first; ``thinet`` ranks by the next
layer's output change on them (greedy, Luo et al. 2017).
"""
from __future__ import annotations

from typing import Any, Callable, overload

from torchslim._registry import Registry
from torchslim.criteria._base import DataDriven, Importance, comparable_across_groups, scatter_to_atoms
from torchslim.criteria.activation import ActivationImportance
from torchslim.criteria.bn_scale import BNScaleImportance, bn_l1_penalty
from torchslim.criteria.fisher import FisherImportance, random_projection_loss
from torchslim.criteria.fpgm import FPGMImportance
from torchslim.criteria.lamp import LAMPImportance
from torchslim.criteria.norm import NormImportance
from torchslim.criteria.random import RandomImportance
from torchslim.criteria.taylor import TaylorImportance
from torchslim.criteria.thinet import ThiNetImportance

CriterionFactory = Callable[[int], Importance]

#: criterion name -> factory ``(seed) -> Importance``; add entries with :func:`register_criterion`.
CRITERIA: Registry[str, CriterionFactory] = Registry("criterion")


@overload
def register_criterion(name: str, *, replace: bool = False) -> Callable[[CriterionFactory], CriterionFactory]: ...


@overload
def register_criterion(name: str, factory: CriterionFactory, *, replace: bool = False) -> CriterionFactory: ...


def register_criterion(name: str, factory: Any = None, *, replace: bool = False) -> Any:
    """Make ``name`` a criterion for ``PruneConfig(criterion=name)``, recipes and the CLI's ``--criterion``.

    ``factory(seed)`` returns the :class:`Importance` (one score per atom, higher = keep); a
    class whose constructor takes the seed works as is. Use it as a decorator or call it with
    the factory. A name registered twice is refused (``ValueError``) unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a criterion's name must be a non-empty string, got {name!r}")
    if factory is None:
        return CRITERIA.register(name, replace=replace)
    return CRITERIA.register(name, factory, replace=replace)


register_criterion("l1", lambda seed: NormImportance(1))
register_criterion("l2", lambda seed: NormImportance(2))
register_criterion("fpgm", lambda seed: FPGMImportance())
register_criterion("bn_scale", lambda seed: BNScaleImportance())
register_criterion("lamp", lambda seed: LAMPImportance())
register_criterion("taylor", lambda seed: TaylorImportance())
register_criterion("fisher", lambda seed: FisherImportance())
register_criterion("apoz", lambda seed: ActivationImportance("apoz"))
register_criterion("mean_activation", lambda seed: ActivationImportance("mean"))
register_criterion("thinet", lambda seed: ThiNetImportance())
register_criterion("random", RandomImportance)


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
    "Importance", "LAMPImportance", "NormImportance", "RandomImportance", "TaylorImportance", "ThiNetImportance", "bn_l1_penalty",
    "comparable_across_groups",
    "make_importance", "random_projection_loss", "register_criterion", "scatter_to_atoms",
]
