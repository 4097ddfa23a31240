"""``reconstruct_(model, original, data)``: after pruning, re-fit every layer that lost input
channels so that, on the calibration data, it reproduces the original layer's output (He et
al., ICCV 2017; the least-squares step of ThiNet, ICCV 2017, and of Kwon et al., NeurIPS 2022;
bias compensation as FLAP, AAAI 2024).

The layers come from the pruned model's history (``torchslim.pruning_history``: which input
channels each Linear / ungrouped Conv2d lost, relative to the original); the Gram matrices of
their inputs are collected on the original model in one pass over ``data``; each layer's kept
output rows get ``W' = (W G[:, K] + lam W_K) (G[K, K] + lam I)^-1`` (:mod:`torchslim.reconstruct.solve`; the
ridge pulls toward the kept weights as they are).
Attention output and FFN down projections are such Linear layers. Grouped and depthwise
convolutions are left as they are (a depthwise layer loses its inputs with its outputs).
Reconstruct before recalibrating BatchNorm: the re-fitted layers reproduce the original
outputs, which the original statistics describe (recalibrate afterwards). Calibrate on data
like what the model will see: fitted on one domain (Python docstrings) and scored on another
(dataset descriptions), all-MiniLM-L6-v2 with 25% of its heads and FFN units removed fell from
0.72 to 0.46 embedding cosine, where calibrating on the scored sentences themselves (an upper
bound) raised it to 0.96.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from torchslim.pruning import PruningPlan
from torchslim.pruning.plan import pruning_history
from torchslim._inputs import call_model
from torchslim.reconstruct.gram import CONSUMERS, _inputs_of, collect_grams, collect_paired
from torchslim.reconstruct.solve import refit, refit_paired

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class ReconstructionReport:
    """Per re-fitted layer: its relative output error on the calibration data with the removed
    inputs simply dropped, and after the re-fit; layers left as they were and why; seconds."""

    errors: dict[str, tuple[float, float]]
    skipped: dict[str, str]
    rows: int
    seconds: float


def reconstruct_(model: nn.Module, original: nn.Module, data: Iterable[Any], *, plan: PruningPlan | None = None,
                 ridge: float = 1e-4, sequential: bool = False) -> ReconstructionReport:
    """Re-fit ``model``'s (pruned, in place) layers that lost input channels against
    ``original`` (the model before pruning, unchanged) on ``data`` (see the module docstring).
    ``plan``: the removal relative to ``original`` (default: ``model``'s pruning history).
    ``sequential=True`` fits each layer, in forward order, on its inputs as the pruned model
    (with the layers before it already re-fitted) computes them, against the original layer's
    output on the original inputs (He et al.); one pass over ``data`` per layer instead of one."""
    start = time.perf_counter()
    removed = (plan if plan is not None else pruning_history(model)).removed
    original_modules = dict(original.named_modules())
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        weight = f"{name}.weight" if name else "weight"
        if 1 not in removed.get(weight, {}):
            continue
        source = original_modules.get(name)
        if not isinstance(module, CONSUMERS) or type(source) is not type(module):
            skipped[name] = f"{type(module).__name__} is not a Linear or Conv2d layer"
        elif isinstance(module, nn.Conv2d) and (module.groups != 1 or getattr(source, "groups", 1) != 1):
            skipped[name] = "grouped or depthwise convolution: its inputs go with its outputs"
        else:
            layers[name] = source
    for name, why in skipped.items():
        LOG.info("reconstruct_: %s left as it is: %s", name, why)
    if not layers:
        return ReconstructionReport({}, skipped, 0, time.perf_counter() - start)
    if sequential:
        data = list(data)
        errors = {}
        for name in _forward_order(original, layers, data[0]):
            target = model.get_submodule(name)
            source = layers[name]
            assert isinstance(target, CONSUMERS) and isinstance(source, CONSUMERS)
            errors[name], rows = _refit_paired(model, original, target, source, removed.get(f"{name}.weight", {}),
                                               data, ridge, name)
        return ReconstructionReport(errors, skipped, rows, time.perf_counter() - start)
    collector = collect_grams(original, layers, data)
    errors = {}
    for name, source in layers.items():
        target = model.get_submodule(name)
        assert isinstance(target, CONSUMERS) and isinstance(source, CONSUMERS)
        errors[name] = _refit_layer(target, source, collector.grams[name],
                                    removed.get(f"{name}.weight", {}), collector.rows[name], ridge, name)
    rows = min(collector.rows.values())
    return ReconstructionReport(errors, skipped, rows, time.perf_counter() - start)


def _forward_order(model: nn.Module, layers: dict[str, nn.Module], batch: Any) -> list[str]:
    """``layers`` in the order ``model`` first calls them on ``batch``."""
    order: list[str] = []
    handles = [module.register_forward_hook(lambda m, a, o, n=name: order.append(n) if n not in order else None)
               for name, module in layers.items()]
    try:
        with torch.no_grad():
            call_model(model.eval(), _inputs_of(batch))
    finally:
        for handle in handles:
            handle.remove()
    return order + [name for name in layers if name not in order]


@torch.no_grad()
def _refit_paired(model: nn.Module, original: nn.Module, module: nn.Linear | nn.Conv2d,
                  source: nn.Linear | nn.Conv2d, removed: dict[int, list[int]], data: list, ridge: float,
                  name: str) -> tuple[tuple[float, float], int]:
    stats = collect_paired(original, model, name, data)
    w = source.weight.detach()
    out_kept = torch.as_tensor(np.setdiff1d(np.arange(w.shape[0]), removed.get(0, [])))
    matrix = w.reshape(w.shape[0], -1)
    bias, new_bias = source.bias, module.bias
    if bias is not None:
        matrix = torch.cat([matrix, bias.detach()[:, None]], dim=1)
    kept_weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    if new_bias is not None:
        kept_weight = torch.cat([kept_weight, new_bias.detach()[:, None]], dim=1)
    stats["kept_weight"] = kept_weight
    result = refit_paired(matrix[out_kept], stats, ridge=ridge, name=name)
    new = result.weight.to(module.weight.dtype)
    if new_bias is not None:
        new_bias.copy_(new[:, -1])
        new = new[:, :-1]
    module.weight.copy_(new.reshape(module.weight.shape))
    return (result.error_before, result.error_after), stats["rows"]


@torch.no_grad()
def _refit_layer(module: nn.Linear | nn.Conv2d, source: nn.Linear | nn.Conv2d, gram: torch.Tensor, removed: dict[int, list[int]],
                 rows: int, ridge: float, name: str) -> tuple[float, float]:
    w = source.weight.detach()
    out_kept = np.setdiff1d(np.arange(w.shape[0]), removed.get(0, []))
    in_kept = np.setdiff1d(np.arange(w.shape[1]), removed[1])
    per_channel = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1  # kernel positions per input channel
    columns = (in_kept[:, None] * per_channel + np.arange(per_channel)[None, :]).reshape(-1)
    matrix = w.reshape(w.shape[0], -1)
    bias, new_bias = source.bias, module.bias
    if bias is not None:
        matrix = torch.cat([matrix, bias.detach()[:, None]], dim=1)
        columns = np.concatenate([columns, [matrix.shape[1] - 1]])
    result = refit(matrix[torch.as_tensor(out_kept)], gram, torch.as_tensor(columns), ridge=ridge, rows=rows, name=name)
    new = result.weight.to(module.weight.dtype)
    if new_bias is not None:
        new_bias.copy_(new[:, -1])
        new = new[:, :-1]
    module.weight.copy_(new.reshape(module.weight.shape))
    return result.error_before, result.error_after
