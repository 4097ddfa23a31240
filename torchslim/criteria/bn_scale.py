"""Network Slimming (Liu et al. 2017): a channel whose BatchNorm scale |gamma| is small is
switched off. Train with ``bn_l1_penalty`` added to the loss to push gammas to zero first.
Groups without a BatchNorm fall back to the L1 filter norm."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from torchslim.criteria._base import owner, score_slots
from torchslim.criteria.norm import NormImportance
from torchslim.graph import DependencyGraph, Group


def _is_bn_weight(model: nn.Module, name: str) -> bool:
    return name.endswith(".weight") and isinstance(owner(model, name), nn.modules.batchnorm._BatchNorm)


class BNScaleImportance:
    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        if not any(_is_bn_weight(graph.model, name) for name, _ in group.params):
            return NormImportance(1)(graph, group)
        return score_slots(graph, group, lambda name, dim, w: w.abs(), lambda name: _is_bn_weight(graph.model, name))


def bn_l1_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """``strength * sum |gamma|`` over every BatchNorm: add it to the training loss (sparsity training)."""
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return strength * torch.stack(terms).sum() if terms else torch.zeros(())
