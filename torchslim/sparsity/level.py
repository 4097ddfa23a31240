"""Level (magnitude) pruning of single weights, as YOLOv5's ``prune(model, 0.3)``.

``sparsify_`` zeroes the smallest-magnitude weights of each selected layer (or the smallest
over all of them with ``scope="global"``) and returns masks that keep them at zero during
fine-tuning. Zeros alone do not make dense kernels faster: this saves size (see
``save_sparse``) and is the first stage of deep compression, not a speed-up on CPU or GPU.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Sequence

import torch
from torch import nn

from torchslim.sparsity.masks import WeightMasks

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d)


@dataclasses.dataclass
class LayerSparsity:
    name: str
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.total, 1)


def sparsity_report(model: nn.Module, op_types: Sequence[type[nn.Module]] = DEFAULT_TYPES) -> list[LayerSparsity]:
    """Fraction of exactly-zero weights per layer."""
    return [LayerSparsity(f"{name}.weight", int((weight == 0).sum()), weight.numel())
            for name, m in model.named_modules()
            if (weight := _weight(m)) is not None and isinstance(m, tuple(op_types))]


def _weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def selected_layers(model: nn.Module, op_types, op_names, exclude, filter_fn) -> list[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of the layers of ``op_types`` with a weight, chosen by the globs and ``filter_fn``."""
    chosen = []
    for name, module in model.named_modules():
        weight = _weight(module)
        if not isinstance(module, tuple(op_types)) or weight is None:
            continue
        if op_names is not None and not any(fnmatch.fnmatchcase(name, p) for p in op_names):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude) or (filter_fn and not filter_fn(name, module)):
            continue
        chosen.append((name, weight))
    if not chosen:
        raise ValueError("sparsify_: no layer matches op_types/op_names/exclude")
    return chosen


@torch.no_grad()
def sparsify_(model: nn.Module, sparsity: float, *, scope: str = "layer", op_types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
              op_names: Sequence[str] | None = None, exclude: Sequence[str] = (),
              filter_fn: Callable[[str, nn.Module], bool] | None = None) -> WeightMasks:
    """Zero the ``sparsity`` fraction of smallest |w| in each selected layer (``scope="layer"``)
    or across all of them (``scope="global"``), in place; returns the masks."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    layers = selected_layers(model, op_types, op_names, exclude, filter_fn)
    masks: dict[str, torch.Tensor] = {}
    if scope == "global":
        magnitudes = torch.cat([weight.detach().abs().flatten() for _, weight in layers])
        k = int(sparsity * magnitudes.numel())
        threshold = torch.kthvalue(magnitudes, k).values if k > 0 else magnitudes.min() - 1
        for name, weight in layers:
            masks[f"{name}.weight"] = weight.detach().abs() > threshold
    else:
        for name, weight in layers:
            masks[f"{name}.weight"] = keep_largest(weight.detach(), sparsity)
    result = WeightMasks(model, masks)
    result.apply_()
    return result


def keep_largest(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask keeping all but the ``sparsity`` fraction of smallest-magnitude entries (ties broken by order)."""
    k = int(sparsity * weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if k > 0:
        keep[torch.argsort(weight.abs().flatten(), stable=True)[:k]] = False
    return keep.view_as(weight)
