"""One-dimensional k-means (Lloyd's algorithm) for weight sharing.

Deep Compression (Han, Mao & Dally, ICLR 2016, "Deep Compression: Compressing Deep Neural
Networks with Pruning, Trained Quantization and Huffman Coding", section 3.1) clusters the
weights of each layer with k-means and compares three initialisations of the centroids:
*linear* (evenly spaced between the smallest and the largest weight; the paper found it best,
since it keeps the few large weights that matter most), *density* (evenly spaced on the
cumulative distribution, i.e. quantiles) and *random* (k distinct weights drawn at random).
The computation is done in float64 so that the result does not depend on the weight dtype.
"""
from __future__ import annotations

import torch

INITS = ("linear", "density", "random")


def initial_centroids(values: torch.Tensor, k: int, init: str = "linear",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The ``k`` starting centroids (float64, sorted) for ``values`` by ``init`` (``linear``,
    ``density`` or ``random``, see the module docstring)."""
    x = values.detach().flatten().to(torch.float64)
    if init == "linear":
        return torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    if init == "density":
        positions = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        return torch.quantile(x.cpu(), positions).to(x.device)
    if init == "random":
        distinct = torch.unique(x)
        chosen = torch.randperm(distinct.numel(), generator=generator)[:k]
        return torch.sort(distinct[chosen.to(distinct.device)]).values
    raise ValueError(f"k-means init must be one of {', '.join(INITS)}, got {init!r}")


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``centroids`` for each value (ties go to the lower one)."""
    x = values.detach().flatten().to(torch.float64)
    c = centroids.to(torch.float64)
    if c.numel() == 1:
        return torch.zeros(x.numel(), dtype=torch.long, device=x.device)
    midpoints = (c[1:] + c[:-1]) / 2
    return torch.bucketize(x, midpoints, right=False)


def cluster_means(values: torch.Tensor, labels: torch.Tensor, k: int, fallback: torch.Tensor) -> torch.Tensor:
    """Mean of the values of each cluster (float64); an empty cluster keeps its ``fallback`` value."""
    x = values.detach().flatten().to(torch.float64)
    sums = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(torch.float64)
    return torch.where(counts > 0, sums / counts.clamp(min=1), fallback.to(torch.float64))


def kmeans_1d(values: torch.Tensor, k: int, *, init: str = "linear", max_iter: int = 100,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster ``values`` into ``k`` clusters; returns ``(centroids, labels)``.

    Lloyd's algorithm: assign each value to its nearest centroid, move every centroid to the mean
    of its values, until no assignment changes (or ``max_iter``). The centroids are returned
    sorted and in float64; ``labels`` (int64, one per value) index them. Every centroid is the
    mean of its cluster's values (an empty cluster keeps its last position). In one dimension the
    clusters are intervals: the values are sorted once and each iteration costs ``O(k log n)``
    (cluster sums from prefix sums), so large layers cluster quickly.
    """
    if k < 1:
        raise ValueError(f"k-means needs k >= 1 clusters, got {k}")
    x = values.detach().flatten().to(torch.float64)
    if x.numel() == 0:
        raise ValueError("k-means needs at least one value")
    if init not in INITS:
        raise ValueError(f"k-means init must be one of {', '.join(INITS)}, got {init!r}")
    centroids = initial_centroids(x, k, init, generator)
    ordered = torch.sort(x).values
    prefix = torch.cat([ordered.new_zeros(1), torch.cumsum(ordered, 0)])
    bounds, midpoints = _bounds(ordered, centroids)
    for _ in range(max_iter):
        centroids = _interval_means(prefix, bounds, centroids)
        centroids = torch.sort(centroids).values
        new_bounds, new_midpoints = _bounds(ordered, centroids)
        if torch.equal(new_bounds, bounds):
            break
        bounds, midpoints = new_bounds, new_midpoints
    centroids = _interval_means(prefix, bounds, centroids)
    return centroids, torch.bucketize(x, midpoints, right=False)  # the assignment ``bounds`` describes


def _bounds(ordered: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start of each cluster's interval in the sorted values (``k + 1`` entries, the last ``n``)
    and the midpoints between the centroids: a value goes to the nearest centroid, a tie to the
    lower one (as :func:`assign`)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    inner = torch.searchsorted(ordered, midpoints, right=True)
    n = torch.tensor([ordered.numel()], device=ordered.device)
    return torch.cat([torch.zeros(1, dtype=torch.long, device=ordered.device), inner, n]), midpoints


def _interval_means(prefix: torch.Tensor, bounds: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    counts = (bounds[1:] - bounds[:-1]).to(torch.float64)
    sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
    return torch.where(counts > 0, sums / counts.clamp(min=1), fallback)
