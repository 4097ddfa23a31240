"""Automated gradual pruning (Zhu & Gupta 2017) inside the user's own training loop.

``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / n)^3`` rises from ``s_i`` to ``s_f`` over ``n``
updates. Call ``pruner.step()`` once per training iteration; every ``frequency`` steps the
masks grow to ``s_t``. Masks stay enforced after each optimizer step (weights and optimizer
state). ``finalize()`` removes the masked channels physically, once (structured), or leaves
the zeros in place (unstructured).

With ``keep_dense=True`` the masks are parametrisations (:func:`torchslim.sparsity.mask_`)
instead of zeros written into the weights: the model computes with the masked weights while
the dense ones are kept (``module.parametrizations.weight.original``), so masks can later be
relaxed (network surgery's splicing); ``finalize()`` bakes them (zeros, plain parameters)
first. Masked weights get zero gradient, so no optimizer hook is needed. Once masked, a
channel or weight stays masked: the schedule only grows the masks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from torchslim.distributed import broadcast_array, broadcast_tensors_, refuse_wrapped
from torchslim._inputs import ExampleInputs
from torchslim.criteria import make_importance
from torchslim.graph import DependencyGraph
from torchslim.pruning import PruneConfig, PruneResult, prune_
from torchslim.pruning import eligible_groups, keep_count
from torchslim.sparsity.level import keep_largest, selected_layers, DEFAULT_TYPES
from torchslim.sparsity.masks import WeightMasks
from torchslim.sparsity.parametrize import mask_, masks_of, remove_masks_, update_masks_


def agp_sparsity(t: int, *, initial: float, final: float, start: int, steps: int) -> float:
    """The cubic AGP schedule at update ``t``."""
    progress = min(max((t - start) / steps, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class AGPPruner:
    """Gradual pruning hook: ``step()`` each iteration, ``finalize()`` at the end."""

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs | None = None, *, final_sparsity: float,
                 total_steps: int, initial_sparsity: float = 0.0, start_step: int = 0, frequency: int = 1,
                 structured: bool = True, config: PruneConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None, keep_dense: bool = False):
        if not 0 <= initial_sparsity <= final_sparsity < 1:
            raise ValueError("need 0 <= initial_sparsity <= final_sparsity < 1")
        refuse_wrapped(model, "AGPPruner")
        if structured and example_inputs is None:
            raise ValueError("structured AGP needs example_inputs to build the dependency graph")
        self.model, self.example_inputs = model, example_inputs
        self.initial, self.final = initial_sparsity, final_sparsity
        self.total_steps, self.start, self.frequency = total_steps, start_step, max(1, frequency)
        self.structured = structured
        self.config = config or PruneConfig(ratio=final_sparsity)
        self.t = 0
        self.current = 0.0
        self.masks = WeightMasks(model, {})
        self.optimizer = optimizer
        self.keep_dense = keep_dense
        self._hook = self.masks.attach(optimizer) if optimizer is not None and not keep_dense else None
        if structured:
            self.graph = DependencyGraph.build(model, example_inputs)
            self.groups = eligible_groups(self.graph, self.config)
            self.importance = make_importance(self.config.criterion, self.config.seed)
            self.params = self.graph.parameters()  # by traced name: still found once masked
            self.masked_atoms = np.zeros(self.graph.n_atoms, dtype=bool)

    def sparsity_at(self, t: int) -> float:
        return agp_sparsity(t, initial=self.initial, final=self.final, start=self.start, steps=self.total_steps)

    def step(self) -> float:
        """Advance one iteration; grow the masks on update steps. Returns the current sparsity."""
        self.t += 1
        if self.t >= self.start and (self.t - self.start) % self.frequency == 0:
            target = self.sparsity_at(self.t)
            if target > self.current:
                self._mask_to(target)
                self.current = target
        return self.current

    @torch.no_grad()
    def _mask_to(self, sparsity: float) -> None:
        if self.structured:
            self.masks.masks = self._structured_masks(sparsity)
        else:  # with keep_dense, module.weight reads the masked weight: masked entries rank first
            layers = selected_layers(self.model, DEFAULT_TYPES, self.config.op_names, self.config.exclude, self.config.filter_fn)
            self.masks.masks = {f"{n}.weight": keep_largest(w.detach(), sparsity) for n, w in layers}
            broadcast_tensors_(self.masks.masks.values())  # under torchrun: rank 0's masks everywhere
        if not self.keep_dense:
            self.masks.apply_()
            return
        masked = masks_of(self.model)
        update_masks_(self.model, {n: m for n, m in self.masks.masks.items() if n in masked})
        mask_(self.model, {n: m for n, m in self.masks.masks.items() if n not in masked})

    def _structured_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        removed = []
        with self._scoring_masked_values():
            all_scores = [np.asarray(self.importance(self.graph, group), dtype=np.float64) for group in self.groups]
        for group, scores in zip(self.groups, all_scores):
            scores[self.masked_atoms[group.atoms]] = -np.inf  # masked once, masked for good
            n_remove = len(group) - keep_count(len(group), sparsity, self.config, atom_width=self.graph.atom_width(group))
            removed.append(group.atoms[np.argsort(scores, kind="stable")[:n_remove]])
        atoms = broadcast_array(np.concatenate(removed) if removed else np.zeros(0, np.int64))  # rank 0's
        self.masked_atoms[atoms] = True
        removal = self.graph.removal(atoms)
        params = self.params
        masks = {}
        for name, dims in removal.items():
            if name not in params:
                continue
            keep = torch.ones_like(params[name], dtype=torch.bool)
            for dim, index in dims.items():
                keep.index_fill_(dim, torch.as_tensor(index, dtype=torch.long), False)
            masks[name] = keep
        return masks

    @contextlib.contextmanager
    def _scoring_masked_values(self) -> Iterator[None]:
        """With ``keep_dense`` the graph's parameters are the dense weights: let criteria see the
        masked values (as hard zeroing leaves them), then put the dense values back, bit for bit."""
        dense = {n: self.params[n].detach().clone() for n in self.masks.masks} if self.keep_dense else {}
        try:
            with torch.no_grad():
                for name in dense:
                    self.params[name].masked_fill_(~self.masks.masks[name], 0.0)
            yield
        finally:
            with torch.no_grad():
                for name, value in dense.items():
                    self.params[name].copy_(value)

    def finalize(self) -> PruneResult | WeightMasks:
        """Structured: remove the masked channels physically (exactly the zeroed ones), slicing the
        optimizer's state alike so training can go on with it. Unstructured: the masks. Under
        torchrun every rank first takes rank 0's buffers (BatchNorm statistics)."""
        if self._hook is not None:
            self._hook.remove()
        # under torchrun: DDP syncs buffers at each forward, so the last one left each rank its own
        # running statistics; every rank finishes with rank 0's, so the pruned models are identical
        broadcast_tensors_(list(self.model.buffers()))
        if not self.structured:
            if self.keep_dense:
                remove_masks_(self.model, list(self.masks.masks), bake=True)
            return self.masks
        self._mask_to(self.final)  # make sure the last masks are the final ones
        if self.keep_dense:
            remove_masks_(self.model, list(self.masks.masks), bake=True)
        # masked atoms have zero weight, so a magnitude ranking at the final ratio removes exactly them
        from dataclasses import replace

        return prune_(self.model, self.example_inputs, replace(self.config, ratio=self.final, criterion="l1",
                                                               target_macs=None), optimizer=self.optimizer)
