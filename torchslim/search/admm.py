"""ADMM structured pruning (Zhang et al., "A Systematic DNN Weight Pruning Framework using
Alternating Direction Method of Multipliers", ECCV 2018; the inner loop of AutoCompress, Liu et
al., AAAI 2020), on the engine's dependency groups.

Inside the user's training loop the loss gets the augmented-Lagrangian term
``rho/2 * sum ||W - Z + U||^2`` over every parameter that holds a prunable group's channels.
``Z`` starts as the projection of ``W`` (``U = 0``); every ``update_every`` steps ``Z``
becomes the projection of ``W + U`` onto the group-sparse set that meets the budget (whole
channels of a dependency group, all coupled tensors together: a channel's energy is summed
over every tensor it lives in, and the engine's ``Selector`` chooses which atoms go exactly as
``prune_`` would under the same ``PruneConfig``), ``U`` moves by ``W - Z`` and ``rho`` grows by
``rho_growth`` (up to ``rho_max``; ``U``, the scaled dual, is rescaled with it). ``finalize_``
removes the zeros of the last ``Z`` (the support training was pulled toward; projecting again
from the final weights picks another one while ADMM has not converged) through the engine
(``torchslim.pruning.remove_``: verified, recorded, all or nothing), so the model comes back
physically smaller.

    admm = ADMMPruner(model, x, PruneConfig(target_macs=0.5))
    for inputs, targets in loader:
        optimizer.zero_grad()
        (loss_fn(model(inputs), targets) + admm.penalty()).backward()
        optimizer.step()
        admm.step()
    result = admm.finalize_()          # then fine-tune as usual
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.graph import DependencyGraph
from torchslim.pruning import PruneConfig, PruneResult, eligible_groups, remove_
from torchslim.pruning.selector import Selector


@dataclasses.dataclass
class ADMMState:
    """After an update: the atoms Z keeps out, ``rho`` and the primal residual ``||W - Z||``."""

    step: int
    removed: int
    rho: float
    residual: float


def check_admm_schedule(rho: float, rho_growth: float, rho_max: float, update_every: int) -> None:
    """Raise ``ValueError`` on a rho schedule or update period ADMM cannot run with."""
    if not rho > 0 or not rho_growth >= 1 or not rho_max >= rho:
        raise ValueError(f"need rho > 0, rho_growth >= 1 and rho_max >= rho; got {rho}, {rho_growth}, {rho_max}")
    if not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an integer >= 1 (steps), got {update_every}")


class ADMMPruner:
    """See the module docstring. ``config`` says how much goes (``ratio``, per-group ``ratios``,
    ``target_macs`` / ``target_params``) and where (scope, ``round_to``, ``exact_only``), as for
    ``prune_``; its criterion is not used (channels are chosen by the energy of ``W + U``)."""

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs, config: PruneConfig | None = None, *,
                 rho: float = 1e-3, rho_growth: float = 1.3, rho_max: float = 1.0, update_every: int = 50):
        check_admm_schedule(rho, rho_growth, rho_max, update_every)
        self.model, self.example_inputs = model, example_inputs
        self.config = config or PruneConfig()
        self.rho, self.rho_growth, self.rho_max, self.update_every = rho, rho_growth, rho_max, update_every
        self.graph = DependencyGraph.build(model, example_inputs)
        self.groups = eligible_groups(self.graph, self.config)
        if not self.groups:
            raise ValueError(f"{type(model).__name__} has no prunable group under this config: nothing for ADMM to do")
        parameters = self.graph.parameters()
        # the parameters holding some group's channels, with the atom label of every index per dim
        self.slots: dict[str, dict[int, np.ndarray]] = {}
        for group in self.groups:
            for name, dim in group.params:
                if name in parameters:
                    self.slots.setdefault(name, {})[dim] = self.graph.param_labels(name, dim)
        self.params = {name: parameters[name] for name in self.slots}
        self.U = {name: torch.zeros_like(p, requires_grad=False) for name, p in self.params.items()}
        self.steps = 0
        self.history: list[ADMMState] = []
        self.removed_atoms = np.zeros(0, dtype=np.int64)
        self.Z: dict[str, torch.Tensor] = {}
        self.update()

    # the ADMM loop --------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum ||W - Z + U||^2``: add it to the loss before ``backward``."""
        terms = [(p - self.Z[n] + self.U[n]).pow(2).sum() for n, p in self.params.items()]
        return 0.5 * self.rho * torch.stack(terms).sum()

    def step(self) -> ADMMState | None:
        """Call after each optimizer step; every ``update_every`` steps updates Z, U and rho."""
        self.steps += 1
        if self.steps % self.update_every:
            return None
        return self.update()

    @torch.no_grad()
    def update(self) -> ADMMState:
        """Z <- projection of W + U; U <- U + W - Z; then rho grows, U rescaled to it (the
        scaled dual is y / rho: Boyd et al. 2011, 3.4.1). The first call (at construction) only
        projects: Z <- projection of W, U = 0."""
        first = not self.history
        shifted = {n: p.detach() + self.U[n] for n, p in self.params.items()}
        self.removed_atoms = self._chosen(shifted)
        keep = np.ones(self.graph.n_atoms, dtype=bool)
        keep[self.removed_atoms] = False
        self.Z = {n: shifted[n] * self._mask(n, keep) for n in self.params}
        state = ADMMState(self.steps, int(self.removed_atoms.size), self.rho, self.residual())
        if not first:
            for n, p in self.params.items():
                self.U[n] += p.detach() - self.Z[n]
            grown = min(self.rho * self.rho_growth, self.rho_max)
            for u in self.U.values():
                u.mul_(self.rho / grown)
            self.rho = grown
        self.history.append(state)
        return state

    def residual(self) -> float:
        """The primal residual ``||W - Z||`` against the last Z: how far the weights still are
        from the group-sparse set (the removed channels' norm)."""
        return math.sqrt(sum(float(((p.detach() - self.Z[n]) ** 2).sum()) for n, p in self.params.items()))

    def finalize_(self, **remove_kwargs: Any) -> PruneResult:
        """Remove the channels Z zeroes, physically, through the engine (checked against the
        model with them zeroed; recorded in the pruning history). The dual state is dropped."""
        return remove_(self.graph, self.removed_atoms, self.example_inputs, **remove_kwargs)

    # helpers --------------------------------------------------------------------------------
    def channel_energy(self, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        """Per atom: the squared norm of its entries summed over every tensor it lives in."""
        energy = np.zeros(self.graph.n_atoms, dtype=np.float64)
        for name, dims in self.slots.items():
            squared = tensors[name].detach().double().pow(2)
            for dim, labels in dims.items():
                others = [d for d in range(squared.ndim) if d != dim]
                per_index = squared.sum(dim=others).cpu().numpy() if others else squared.cpu().numpy()
                energy += np.bincount(labels, weights=per_index, minlength=self.graph.n_atoms)
        return energy

    def _chosen(self, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        energy = self.channel_energy(tensors)
        scores = {g.index: energy[g.atoms] for g in self.groups}
        _, removed = Selector(self.graph, self.groups, scores, self.config).select(np.zeros(self.graph.n_atoms, bool))
        return np.sort(np.asarray(removed, dtype=np.int64))

    def _mask(self, name: str, keep: np.ndarray) -> torch.Tensor:
        param = self.params[name]
        mask = torch.ones_like(param)
        for dim, labels in self.slots[name].items():
            shape = [1] * param.ndim
            shape[dim] = -1
            mask = mask * torch.as_tensor(keep[labels], dtype=param.dtype, device=param.device).reshape(shape)
        return mask
