"""The least-squares re-fit of one layer from its input Gram matrix.

With ``X`` the original inputs (a column of ones appended when there is a bias), ``W`` the
original weights (the bias as the last column) and ``K`` the columns the pruned layer still
reads, the new weights minimise ``||X W^T - X_K W'^T||^2 + lam ||W' - W_K||^2``:
``W' = (W G[:, K] + lam W_K) (G[K, K] + lam I)^-1`` with ``G = X^T X``, solved in float64. The
ridge pulls toward the kept weights as they are (not toward zero), so a larger ``ridge``
moves the fit from the full re-fit to no change at all, never below both: with few calibration
rows for a wide layer (a transformer's FFN on a few sentences) that trades fitting the
calibration set for staying near the trained weights. The ones column is always kept, so a
removed channel's mean contribution moves into the bias (bias compensation). ``lam`` is
``ridge`` times the mean of ``diag(G[K, K])``."""
from __future__ import annotations

import dataclasses
import warnings

import torch


class RankDeficientWarning(UserWarning):
    """Fewer calibration rows than the layer reads: the ridge term decides part of the fit."""


@dataclasses.dataclass
class Refit:
    """The new weights (float64, ``(out, len(kept))``) and the relative output error on the
    calibration data before (the kept columns of ``W`` as they are) and after the re-fit."""

    weight: torch.Tensor
    error_before: float
    error_after: float


def refit(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, *, ridge: float = 1e-4,
          rows: int | None = None, name: str = "layer") -> Refit:
    """Least-squares weights over the ``kept`` columns reproducing ``weight``'s outputs (see
    the module docstring); ``weight`` is ``(out, columns)`` with the bias, if any, last."""
    w = weight.detach().double()
    g = gram.double()
    kept = torch.as_tensor(kept, dtype=torch.long)
    if rows is not None and rows < kept.numel():
        warnings.warn(f"{name}: {rows} calibration rows for {kept.numel()} input columns: the Gram matrix is rank "
                      f"deficient and ridge fills the gap; give at least {kept.numel()} rows", RankDeficientWarning,
                      stacklevel=3)
    gkk = g[kept][:, kept]
    lam = ridge * float(gkk.diagonal().mean().clamp_min(1e-12))
    system = gkk + lam * torch.eye(kept.numel(), dtype=g.dtype)
    new = torch.linalg.solve(system, (w @ g[:, kept] + lam * w[:, kept]).T).T  # (W G[:, K] + lam W_K) (...)^-1
    total = _energy(w, g)
    before = _error(w, g, w[:, kept], kept)
    after = _error(w, g, new, kept)
    return Refit(new, before / total if total > 0 else 0.0, after / total if total > 0 else 0.0)


def _energy(w: torch.Tensor, g: torch.Tensor) -> float:
    return float(torch.sqrt(torch.clamp((w @ g * w).sum(), min=0.0)))


def _error(w: torch.Tensor, g: torch.Tensor, new: torch.Tensor, kept: torch.Tensor) -> float:
    """``||X W^T - X_K new^T||`` from the Gram matrix alone."""
    return squared_error(w, g, new, kept) ** 0.5


def squared_error(w: torch.Tensor, g: torch.Tensor, new: torch.Tensor, kept: torch.Tensor) -> float:
    """``||X W^T - X_K new^T||^2`` from the Gram matrix ``g = X^T X`` alone (``new`` over the
    columns ``kept``): how well a fit reproduces the outputs on the rows ``g`` summarises."""
    full = torch.zeros_like(w)
    full[:, kept] = new
    diff = w - full
    return max(float((diff @ g * diff).sum()), 0.0)


def refit_paired(weight: torch.Tensor, stats: dict, *, ridge: float = 1e-4, name: str = "layer") -> Refit:
    """Least-squares weights for the pruned layer's own inputs Y reproducing ``weight``'s output
    on the original inputs X: ``W' = (W C^T + lam W_K) (A + lam I)^-1`` from ``collect_paired``'s
    statistics (``C = Y^T X``, ``A = Y^T Y``, ``G = X^T X`` for the errors; ``W_K`` the layer's
    current weights, ``stats["kept_weight"]``, zero when absent)."""
    w = weight.detach().double()
    a, c, g = stats["A"], stats["C"], stats["G"]
    k = a.shape[0]
    if stats["rows"] < k:
        warnings.warn(f"{name}: {stats['rows']} calibration rows for {k} input columns: the Gram matrix is rank "
                      f"deficient and ridge fills the gap; give at least {k} rows", RankDeficientWarning, stacklevel=3)
    lam = ridge * float(a.diagonal().mean().clamp_min(1e-12))
    anchor = stats["kept_weight"].double() if "kept_weight" in stats else torch.zeros(w.shape[0], k, dtype=w.dtype)
    new = torch.linalg.solve(a + lam * torch.eye(k, dtype=a.dtype), c @ w.T + lam * anchor.T).T
    total = float((w @ g * w).sum())
    before = paired_squared_error(w, stats, stats["kept_weight"].double()) if "kept_weight" in stats else None
    return Refit(new, _relative(before, total) if before is not None else 0.0,
                 _relative(paired_squared_error(w, stats, new), total))


def paired_squared_error(w: torch.Tensor, stats: dict, new: torch.Tensor) -> float:
    """``||X W^T - Y new^T||^2 = tr(W G W^T) - 2 tr(new C W^T) + tr(new A new^T)`` from
    ``collect_paired``'s statistics alone: how well ``new``, reading the pruned model's inputs
    Y, reproduces ``w``'s output on the original inputs X over the rows they summarise."""
    w, new = w.double(), new.double()
    return float((w @ stats["G"] * w).sum() - 2 * (new @ stats["C"] * w).sum() + (new @ stats["A"] * new).sum())


def _relative(squared: float, total: float) -> float:
    return (max(squared, 0.0) / total) ** 0.5 if total > 0 else 0.0
