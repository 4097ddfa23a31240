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
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from torchslim.pruning import PruningPlan
from torchslim.pruning.plan import pruning_history
from torchslim._inputs import call_model
from torchslim.reconstruct.gram import CONSUMERS, _inputs_of, collect_grams, collect_paired
from torchslim.reconstruct.solve import RankDeficientWarning, paired_squared_error, refit, refit_paired, squared_error

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class ReconstructionReport:
    """Per re-fitted layer: its relative output error on the calibration data with the removed
    inputs simply dropped, and after the re-fit; layers left as they were and why; seconds."""

    errors: dict[str, tuple[float, float]]
    skipped: dict[str, str]
    rows: int
    seconds: float
    ridges: dict[str, float] = dataclasses.field(default_factory=dict)  # per layer, the ridge used


#: the ridges ``ridge="auto"`` chooses among, per layer, by two-fold cross-validation
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


def reconstruct_(model: nn.Module, original: nn.Module, data: Iterable[Any], *, plan: PruningPlan | None = None,
                 ridge: float | str = 1e-4, sequential: bool = False) -> ReconstructionReport:
    """Re-fit ``model``'s (pruned, in place) layers that lost input channels against
    ``original`` (the model before pruning, unchanged) on ``data`` (see the module docstring).
    ``plan``: the removal relative to ``original`` (default: ``model``'s pruning history).
    ``ridge="auto"`` chooses each layer's ridge from ``RIDGE_GRID`` by two-fold cross-validation
    over the batches (even / odd): the one whose fit on one half best reproduces the other half's
    outputs, then fits on all of them; for few calibration rows per input column (a wide FFN
    on a few hundred sentences) it keeps a layer from following its calibration text.
    ``sequential=True`` fits each layer, in forward order, on its inputs as the pruned model
    (with the layers before it already re-fitted) computes them, against the original layer's
    output on the original inputs (He et al.), so a layer also corrects what the layers before
    it could not; one pass over ``data`` per layer instead of one (with ``ridge="auto"`` the
    statistics are kept per half of the batches and the ridge cross-validated the same way)."""
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
            assert isinstance(source, CONSUMERS) and isinstance(module, CONSUMERS)
            _check_removal_matches(name, module, source, removed.get(weight, {}))
            layers[name] = source
    for name, why in skipped.items():
        LOG.info("reconstruct_: %s left as it is: %s", name, why)
    if not layers:
        return ReconstructionReport({}, skipped, 0, time.perf_counter() - start)
    auto = _check_ridge(ridge)
    if auto or sequential:
        batches = list(data)
        if auto and len(batches) < 2:
            raise ValueError(f"reconstruct_(ridge='auto') needs at least 2 calibration batches to cross-validate, "
                             f"got {len(batches)}")
        if sequential:
            errors, rows, ridges = _reconstruct_sequentially(model, original, layers, removed, batches, ridge)
            return ReconstructionReport(errors, skipped, rows, time.perf_counter() - start, ridges)
        halves = [collect_grams(original, layers, batches[0::2]), collect_grams(original, layers, batches[1::2])]
        grams = {name: halves[0].grams[name] + halves[1].grams[name] for name in layers}
        counts = {name: halves[0].rows[name] + halves[1].rows[name] for name in layers}
    else:
        collector = collect_grams(original, layers, data)
        grams, counts = collector.grams, collector.rows
    errors, ridges = {}, {}
    for name, source in layers.items():
        target = model.get_submodule(name)
        assert isinstance(target, CONSUMERS) and isinstance(source, CONSUMERS)
        columns = _columns(source, removed.get(f"{name}.weight", {}))
        ridges[name] = _cross_validated_ridge(source, halves[0].grams[name], halves[1].grams[name], columns) \
            if auto else float(ridge)
        errors[name] = _refit_layer(target, source, grams[name], columns, counts[name], ridges[name], name)
    rows = min(counts.values())
    return ReconstructionReport(errors, skipped, rows, time.perf_counter() - start, ridges)


def _check_removal_matches(name: str, module: nn.Linear | nn.Conv2d, source: nn.Linear | nn.Conv2d,
                           removed: dict[int, list[int]]) -> None:
    """The removal must take ``source``'s weight to ``module``'s shape, else ``plan`` (or the
    pruning history) does not describe ``original`` -> ``model``: a clear error, nothing changed."""
    before, after = tuple(source.weight.shape), tuple(module.weight.shape)
    expected = tuple(size - len(removed.get(dim, [])) if dim < 2 else size for dim, size in enumerate(before))
    if expected != after:
        raise ValueError(f"reconstruct_: layer '{name}' is {after} in the pruned model, but the removal recorded for it "
                         f"takes the original's {before} to {expected}: the plan does not describe original -> model "
                         "(was the original pruned before? pass plan=result.plan of the prune_ between them)")


def _check_ridge(ridge: float | str) -> bool:
    """Whether ``ridge`` asks for cross-validation; anything but ``"auto"`` or a number >= 0 is refused."""
    if ridge == "auto":
        return True
    if isinstance(ridge, str) or not ridge >= 0:
        raise ValueError(f"reconstruct_: ridge must be a number >= 0 or 'auto', got {ridge!r}")
    return False


def _columns(source: nn.Linear | nn.Conv2d, removed: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(kept output rows, kept columns of ``weight.reshape(out, -1)`` with the bias column last)."""
    w = source.weight
    out_kept = np.setdiff1d(np.arange(w.shape[0]), removed.get(0, []))
    in_kept = np.setdiff1d(np.arange(w.shape[1]), removed.get(1, []))
    per_channel = int(np.prod(w.shape[2:])) if w.ndim > 2 else 1  # kernel positions per input channel
    columns = (in_kept[:, None] * per_channel + np.arange(per_channel)[None, :]).reshape(-1)
    if source.bias is not None:
        columns = np.concatenate([columns, [int(np.prod(w.shape[1:]))]])
    return out_kept, columns


def _matrix(source: nn.Linear | nn.Conv2d) -> torch.Tensor:
    """The layer's weight as ``(out, columns)`` with its bias, if any, as the last column."""
    matrix = source.weight.detach().reshape(source.weight.shape[0], -1)
    return torch.cat([matrix, source.bias.detach()[:, None]], dim=1) if source.bias is not None else matrix


def _cross_validated_ridge(source: nn.Linear | nn.Conv2d, first: torch.Tensor, second: torch.Tensor,
                           columns: tuple[np.ndarray, np.ndarray]) -> float:
    """The one-pass fit's ridge, cross-validated on the two halves' Gram matrices (squared
    errors from the Gram matrices alone)."""
    out_kept, kept = columns
    w = _matrix(source)[torch.as_tensor(out_kept)].double()
    kept_t = torch.as_tensor(kept)
    return _grid_ridge((first, second), lambda gram, ridge: refit(w, gram, kept_t, ridge=ridge).weight,
                       lambda gram, new: squared_error(w, gram.double(), new, kept_t))


def _grid_ridge(halves: tuple[Any, Any], fit: Callable[[Any, float], torch.Tensor],
                error: Callable[[Any, torch.Tensor], float]) -> float:
    """The ridge of ``RIDGE_GRID`` whose ``fit`` on one half's statistics best reproduces the
    other half's outputs (``error``, summed both ways)."""
    scores = []
    for candidate in RIDGE_GRID:
        total = 0.0
        for fit_on, score_on in (halves, halves[::-1]):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RankDeficientWarning)
                new = fit(fit_on, candidate)
            total += error(score_on, new)
        scores.append(total)
    return RIDGE_GRID[int(np.argmin(scores))]


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


def _reconstruct_sequentially(model: nn.Module, original: nn.Module, layers: dict[str, nn.Module],
                              removed: dict[str, dict[int, list[int]]], batches: list, ridge: float | str
                              ) -> tuple[dict[str, tuple[float, float]], int, dict[str, float]]:
    """``sequential=True``: each layer in forward order re-fitted on the pruned model's inputs."""
    errors, ridges, rows = {}, {}, 0
    for name in _forward_order(original, layers, batches[0]):
        target, source = model.get_submodule(name), layers[name]
        assert isinstance(target, CONSUMERS) and isinstance(source, CONSUMERS)
        errors[name], rows, ridges[name] = _refit_paired(model, original, target, source,
                                                         removed.get(f"{name}.weight", {}), batches, ridge, name)
    return errors, rows, ridges


@torch.no_grad()
def _refit_paired(model: nn.Module, original: nn.Module, module: nn.Linear | nn.Conv2d,
                  source: nn.Linear | nn.Conv2d, removed: dict[int, list[int]], data: list, ridge: float | str,
                  name: str) -> tuple[tuple[float, float], int, float]:
    """Re-fit ``module`` on the pruned model's own inputs (``sequential=True``); with
    ``ridge="auto"`` the statistics are collected per half of ``data`` and the ridge chosen as
    in the one-pass fit. Returns the errors, the rows and the ridge used."""
    out_kept, _ = _columns(source, removed)
    w = _matrix(source)[torch.as_tensor(out_kept)]
    kept_weight = _matrix(module)
    if ridge == "auto":
        halves = [collect_paired(original, model, name, data[0::2]), collect_paired(original, model, name, data[1::2])]
        for half in halves:
            half["kept_weight"] = kept_weight
        ridge = _grid_ridge((halves[0], halves[1]), lambda stats, ridge: refit_paired(w, stats, ridge=ridge).weight,
                            lambda stats, new: paired_squared_error(w, stats, new))
        stats = {key: halves[0][key] + halves[1][key] for key in ("G", "A", "C", "rows")}
    else:
        stats = collect_paired(original, model, name, data)
    stats["kept_weight"] = kept_weight
    result = refit_paired(w, stats, ridge=float(ridge), name=name)
    _write(module, result.weight)
    return (result.error_before, result.error_after), stats["rows"], float(ridge)


@torch.no_grad()
def _refit_layer(module: nn.Linear | nn.Conv2d, source: nn.Linear | nn.Conv2d, gram: torch.Tensor,
                 kept: tuple[np.ndarray, np.ndarray], rows: int, ridge: float, name: str) -> tuple[float, float]:
    out_kept, columns = kept  # as _columns gives them
    result = refit(_matrix(source)[torch.as_tensor(out_kept)], gram, torch.as_tensor(columns), ridge=ridge, rows=rows,
                   name=name)
    _write(module, result.weight)
    return result.error_before, result.error_after


@torch.no_grad()
def _write(module: nn.Linear | nn.Conv2d, new: torch.Tensor) -> None:
    """Store a fitted ``(out, columns)`` matrix (bias last, if the layer has one) in ``module``."""
    new = new.to(module.weight.dtype)
    if module.bias is not None:
        module.bias.copy_(new[:, -1])
        new = new[:, :-1]
    module.weight.copy_(new.reshape(module.weight.shape))
