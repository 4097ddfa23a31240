"""Fisher / squared group Taylor (Molchanov et al. 2019, Theis et al. 2018): an atom's score is
the mean over batches of ``(sum of w * dL/dw over every weight the atom owns)^2``.

Unlike :mod:`taylor` (signed contributions summed over batches, then ``abs``), each batch's
group sum is squared before averaging, so contributions of opposite sign do not cancel.
That makes it work without labels: with ``loss_fn = (output * random_direction).sum()``
(a new random direction per batch) the expectation of the square is the squared change
of the output when the atom is removed, to first order -- a direct measure of how much
the model's function depends on it (see :func:`random_projection_loss`).

The scores are in the loss's units in every group (the diagonal Fisher information of a mask
on the atom, Kwon et al., NeurIPS 2022), so they compare across layers as they are:
``PruneConfig(criterion="fisher", global_ranking=True, target_macs=...)`` is Kwon et al.'s mask
search (heads, FFN units, channels kept where the estimated loss per MAC saved is highest).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch

from torchslim.distributed import all_reduce_arrays
from torchslim.criteria._base import rows, score_slots
from torchslim.criteria.taylor import batch_saliencies
from torchslim.graph import DependencyGraph, Group


class FisherImportance:
    comparable_across_groups = True  # estimated loss increases: global ranking compares them as they are

    def __init__(self, max_batches: int | None = None):
        self.max_batches = max_batches
        self.scores: dict[int, np.ndarray] = {}

    def prepare(self, graph: DependencyGraph, data: Iterable[Any], loss_fn: Callable | None) -> None:
        saliencies = batch_saliencies(graph.model, data, loss_fn, self.max_batches, "fisher",
                                      " (torchslim.criteria.random_projection_loss works without labels)")
        sums = {g.index: np.zeros(len(g)) for g in graph.groups}
        batches = 0
        for saliency in saliencies:
            for group in graph.groups:
                signed = score_slots(graph, group, lambda name, dim, w: rows(saliency[name], dim).sum(1),  # noqa: B023
                                     select=lambda name: name in saliency, upcast=False)  # noqa: B023 - both are called by score_slots, in this iteration
                sums[group.index] += signed ** 2
            batches += 1
        summed = all_reduce_arrays({**sums, "batches": batches})  # under torchrun: every rank's batches
        batches = int(summed.pop("batches"))
        sums = summed
        if batches == 0:
            raise ValueError("criterion 'fisher' got no batches in data=")
        self.scores = {index: total / batches for index, total in sums.items()}

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        if not self.scores:
            raise RuntimeError("FisherImportance.prepare(graph, data, loss_fn) must run first")
        return self.scores[group.index]


def random_projection_loss(embed: Callable[[Any, Any], torch.Tensor] | None = None, seed: int = 0):
    """A label-free ``loss_fn`` for ``fisher``: the output (or ``embed(output, batch)``) projected
    on a fresh random direction per batch; ``embed`` picks the tensor that matters (e.g. pooled
    sentence embeddings, which need the batch's attention mask) from the model's output."""
    generator = torch.Generator().manual_seed(seed)

    def loss(output: Any, batch: Any) -> torch.Tensor:
        value = embed(output, batch) if embed is not None else output
        direction = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        return (value * direction.to(value.device)).sum()

    return loss
