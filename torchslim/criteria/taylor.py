"""Taylor first-order (Molchanov et al. 2019): the loss change from removing a channel is
approximated by ``|sum(w * dL/dw)|`` over the channel's weights, accumulated over user
batches with real gradients from ``loss_fn(output, batch)``."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from torchslim._inputs import call_model
from torchslim.criteria._base import iter_batches, rows, score_slots
from torchslim.distributed import all_reduce_tensors_
from torchslim.graph import DependencyGraph, Group


class TaylorImportance:
    def __init__(self, max_batches: int | None = None):
        self.max_batches = max_batches
        self.saliency: dict[str, torch.Tensor] = {}

    def prepare(self, graph: DependencyGraph, data: Iterable[Any], loss_fn: Callable | None) -> None:
        saliencies = batch_saliencies(graph.model, data, loss_fn, self.max_batches, "taylor")
        totals = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in graph.model.named_parameters()}
        for saliency in saliencies:
            for n, value in saliency.items():
                totals[n] += value
        all_reduce_tensors_(list(totals.values()))  # under torchrun: the sum over every rank's batches
        self.saliency = totals

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        if not self.saliency:
            raise RuntimeError("TaylorImportance.prepare(graph, data, loss_fn) must run first")
        return score_slots(graph, group, lambda name, dim, w: rows(self.saliency[name], dim).sum(1).abs(),
                           upcast=False)


def batch_inputs(batch: Any) -> Any:
    """The model inputs of a batch: ``(inputs, target)`` pairs give their first item."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[1], dict):
        return batch[0]
    return batch


def batch_saliencies(model: torch.nn.Module, data: Iterable[Any] | None, loss_fn: Callable | None,
                     max_batches: int | None, criterion: str, hint: str = "") -> Iterator[dict[str, torch.Tensor]]:
    """Per batch, ``w * dL/dw`` for every parameter that got a gradient (real autograd on
    ``loss_fn(output, batch)``); parameters' ``requires_grad`` flags are restored afterwards.
    Missing ``data`` or ``loss_fn`` is refused now, naming ``criterion`` (and ``hint``)."""
    if data is None or loss_fn is None:
        raise ValueError(f"criterion '{criterion}' needs data= (batches) and loss_fn=(output, batch) -> loss in "
                         f"prune_{hint}")
    return _saliencies(model, data, loss_fn, max_batches)


def _saliencies(model, data, loss_fn, max_batches) -> Iterator[dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in iter_batches(data, max_batches):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss_fn(call_model(model, batch_inputs(batch)), batch).backward()
            yield {n: (p.detach() * p.grad.detach()).float() for n, p in params.items() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(flags[n])
