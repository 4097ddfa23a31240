"""Activation statistics on user batches (Hu et al. 2016 APoZ; mean activation rank).

Forward hooks on every leaf module record its output; each output element is mapped to
its atom through the traced graph (the k-th call of a module is the k-th traced call),
so the statistic lands on exactly the channels the engine would remove.

* APoZ: the fraction of zeros a channel outputs; channels that are mostly zero go first
  (score = 1 - APoZ, higher = keep). Measured on activation outputs (ReLU-like modules).
* Mean activation: the mean absolute activation of a channel (higher = keep).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from torchslim.distributed import all_reduce_arrays
from torchslim._inputs import call_model
from torchslim.criteria._base import iter_batches, scatter_to_atoms
from torchslim.criteria.taylor import batch_inputs
from torchslim.graph import DependencyGraph, Group
from torchslim.graph import module_names
from torchslim.modes import training_mode

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.PReLU, nn.Sigmoid,
               nn.Tanh)


class ActivationImportance:
    """Per-channel activation statistic accumulated on user batches."""

    def __init__(self, statistic: str = "apoz", max_batches: int | None = None):
        if statistic not in ("apoz", "mean"):
            raise ValueError(f"statistic must be 'apoz' or 'mean', got {statistic!r}")
        self.statistic = statistic
        self.max_batches = max_batches
        self.sums: dict[int, np.ndarray] = {}  # traced node -> per-element sum over its channel dims
        self.counts: dict[int, int] = {}

    def prepare(self, graph: DependencyGraph, data: Iterable[Any], loss_fn: Callable | None = None) -> None:
        if data is None:
            raise ValueError(f"criterion '{'apoz' if self.statistic == 'apoz' else 'mean_activation'}' needs data= (batches) in prune_")
        model = graph.model
        names = module_names(model)
        call_index: dict[str, int] = defaultdict(int)
        handles = []

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            name = names[id(module)]
            calls = graph.trace.module_calls.get(name, [])
            k = call_index[name]
            call_index[name] += 1
            if k >= len(calls) or not calls[k].outputs or not isinstance(output, torch.Tensor):
                return
            node = calls[k].outputs[0]
            if tuple(output.shape[1:]) != graph.trace.nodes[node].shape[1:]:
                return
            value = (output == 0).float() if self.statistic == "apoz" else output.abs().float()
            # reduce over the batch, keep every other dim: the graph tells which dims are channels
            per_element = value.mean(0).detach().double().cpu().numpy()
            self.sums[node] = self.sums.get(node, 0) + per_element
            self.counts[node] = self.counts.get(node, 0) + 1

        for module in model.modules():
            if isinstance(module, ACTIVATIONS) or (self.statistic == "mean" and not list(module.children())):
                handles.append(module.register_forward_hook(hook))
        try:
            with training_mode(model, False), torch.no_grad():
                for batch in iter_batches(data, self.max_batches):
                    call_index.clear()
                    call_model(model, batch_inputs(batch))
        finally:
            for h in handles:
                h.remove()
        self._reduce_over_ranks()

    def _reduce_over_ranks(self) -> None:
        """Under torchrun, the sums and counts over every rank's batches."""
        summed = all_reduce_arrays({**{("sum", n): v for n, v in self.sums.items()},
                                    **{("count", n): c for n, c in self.counts.items()}})
        self.sums = {n: summed[("sum", n)] for n in self.sums}
        self.counts = {n: summed[("count", n)] for n in self.counts}

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        scores = np.zeros(len(group), dtype=np.float64)
        weights = np.zeros(len(group), dtype=np.float64)
        c = graph.coupling
        for node, total in self.sums.items():
            mean = total / self.counts[node]
            shape = graph.trace.nodes[node].shape
            for d in range(1, len(shape)):
                labels = graph.labels[c.ids(node, d)]
                if not np.isin(labels, group.atoms).any():
                    continue
                per_index = np.moveaxis(mean, d - 1, 0).reshape(shape[d], -1).mean(1)
                scatter_to_atoms(graph, group, labels, per_index, scores)
                scatter_to_atoms(graph, group, labels, np.ones_like(per_index), weights)
        mean_stat = np.divide(scores, weights, out=np.zeros_like(scores), where=weights > 0)
        if self.statistic == "apoz":
            return np.where(weights > 0, 1.0 - mean_stat, 1.0)  # unmeasured atoms are kept
        return np.where(weights > 0, mean_stat, np.inf)
