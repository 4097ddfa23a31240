"""AMC (He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices",
ECCV 2018): a reinforcement-learning agent walks the prunable groups in order and picks each
one's share removed; the reward is the evaluator's score of the pruned model.

Each episode visits the groups in graph order. The state of group t is AMC's layer embedding,
read off the traced graph: position t, the group's width (atoms), the kernel size and stride
of the layer producing it (1 for a Linear; the first weight with the group's rows), its MACs
per channel width (MACs over parameters of the producer: the spatial size for a convolution),
the MACs the group ties up (what removing it at the upper bound frees), the MACs already
removed by earlier actions, the MACs the later groups tie up, and the previous action; each
feature min-max normalised over the groups, as in the paper. The agent is a DDPG
(:mod:`torchslim.search._ddpg`) whose action is clipped, as the paper does, so the budget stays
reachable: the least share that still meets the budget if every later group is cut to the
upper bound (bisection on the graph's MACs / params / predicted latency, no model run). The
episode's ratios are then scaled onto the budget exactly and evaluated by the search loop
(recorded, resumable); the reward is the score (``-inf`` for a non-finite one). The first
``warmup`` episodes take uniform random actions; then the noise is truncated-normal with scale
``sigma`` decayed by ``sigma_decay`` per episode.

Where this departs from the paper: every transition of an episode carries the episode's
reward (as the authors' code does) with discount 0, so the critic regresses each step's
action onto the score it led to (a Monte-Carlo target; the paper's discount of 1 over that
reward adds the remaining steps' values to the target); the policy trains
``updates_per_episode`` gradient steps after each episode (16 by default: on the small
problems here one step per layer, the paper's schedule, left the policy 0.2 from a known
optimum after 300 episodes where 16 got within 0.1). Channels inside a group go by the
configured criterion. ``search.agent.state_dict()`` holds the trained policy; with
``history=`` it is also saved next to the history (``<history>.policy.pt``).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.pruning.selector import TARGET_SEARCH_MAX_RATIO
from torchslim.search._ddpg import DDPGAgent, DDPGConfig
from torchslim.search.base import Search, SearchWarning, _Exhausted

BISECTION_STEPS = 14
STATE_FEATURES = 9  # 6 static + removed so far, later, previous action


class AMCSearch(Search):
    """AMC (see the module docstring). Needs a budget. ``episodes`` (evaluations), ``warmup``
    (random episodes first), ``lower`` / ``upper``: bounds of each group's share removed;
    ``sigma`` / ``sigma_decay``: exploration noise; ``ddpg``: the agent's hyper-parameters."""

    method = "amc"

    def __init__(self, *args: Any, episodes: int = 300, warmup: int = 100, lower: float = 0.0,
                 upper: float = TARGET_SEARCH_MAX_RATIO, sigma: float = 0.5, sigma_decay: float = 0.99,
                 updates_per_episode: int = 16, ddpg: DDPGConfig | None = None, **kwargs: Any):
        self.check_options(episodes, warmup, lower, upper, sigma, sigma_decay, updates_per_episode)
        self.ddpg = ddpg or DDPGConfig(hidden=64, actor_lr=1e-3, critic_lr=3e-3, tau=0.05)
        self.ddpg.check()
        super().__init__(*args, **kwargs)
        if self.space.quantity is None:
            raise ValueError("AMC needs a budget: target_macs, target_params or target_latency")
        self.episodes, self.warmup, self.lower, self.upper = episodes, warmup, lower, upper
        self.sigma, self.sigma_decay, self.updates_per_episode = sigma, sigma_decay, updates_per_episode
        self.order = [g.index for g in self.space.groups]
        self._check_upper_reaches_budget()
        self.static = self._static_features()
        self.agent = DDPGAgent(STATE_FEATURES, self.ddpg, seed=self.seed)
        self.losses: list[tuple[float, float]] = []

    @staticmethod
    def check_options(episodes: int, warmup: int, lower: float, upper: float, sigma: float, sigma_decay: float,
                      updates_per_episode: int) -> None:
        """Raise ``ValueError`` on settings AMC cannot run with (before any tracing)."""
        if episodes < 1 or not 0 <= warmup < episodes:
            raise ValueError(f"need episodes >= 1 and 0 <= warmup < episodes; got {episodes}, {warmup}")
        if not 0 <= lower < upper <= TARGET_SEARCH_MAX_RATIO:
            raise ValueError(f"need 0 <= lower < upper <= {TARGET_SEARCH_MAX_RATIO}; got {lower}, {upper}")
        if not sigma >= 0 or not 0 < sigma_decay <= 1:
            raise ValueError(f"need sigma >= 0 and sigma_decay in (0, 1]; got {sigma}, {sigma_decay}")
        if updates_per_episode < 1:
            raise ValueError(f"updates_per_episode must be >= 1, got {updates_per_episode}")

    def options(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "warmup": self.warmup, "lower": self.lower, "upper": self.upper,
                "sigma": self.sigma, "sigma_decay": self.sigma_decay,
                "updates_per_episode": self.updates_per_episode, "ddpg": vars(self.ddpg)}

    # the episodes ----------------------------------------------------------------------------
    def explore(self) -> None:
        sigma = self.sigma
        for episode in range(self.episodes):
            states, actions = self.episode(episode, sigma)
            ratios = dict(zip(self.order, actions))
            record = self.evaluate_ratios(ratios, note=f"episode {episode}")
            reward = record.score if math.isfinite(record.score) else self._worst()
            for t, (state, action) in enumerate(zip(states, actions)):
                last = t == len(states) - 1
                self.agent.observe(state, self._to_unit(action), reward, states[t if last else t + 1], last)
            if episode >= self.warmup:
                self._train()
                sigma *= self.sigma_decay
            self._save_policy()

    def episode(self, episode: int, sigma: float) -> tuple[list[np.ndarray], list[float]]:
        """One walk over the groups: (states, clipped actions as shares removed)."""
        states: list[np.ndarray] = []
        actions: list[float] = []
        for t in range(len(self.order)):
            state = self.state(t, actions)
            unit = float(self.rng.uniform()) if episode < self.warmup else self.agent.act(state, sigma)
            action = self.clip(t, actions, self.lower + unit * (self.upper - self.lower))
            states.append(state)
            actions.append(action)
        return states, actions

    def clip(self, t: int, earlier: list[float], action: float) -> float:
        """``action`` for group ``t`` raised to the least share with which the budget can still
        be met by cutting every later group to ``upper`` (AMC's budget guarantee)."""
        def fits(a: float) -> bool:
            return self.space.meets(self.space.measure(self._ratios(earlier + [a], tail=self.upper)))

        if fits(action):
            return action
        low, high = action, self.upper
        for _ in range(BISECTION_STEPS):
            mid = (low + high) / 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        return high

    def _ratios(self, actions: list[float], tail: float | None = None) -> dict[int, float]:
        ratios = dict(zip(self.order, actions))
        if tail is not None:
            ratios.update({g: tail for g in self.order[len(actions):]})
        return self.space.clip(ratios)

    def _train(self) -> None:
        for _ in range(self.updates_per_episode):
            losses = self.agent.update()
            self.losses.append(losses)
            if not all(math.isfinite(v) for v in losses):
                warnings.warn(f"amc: the critic diverged (loss {losses[0]}) after {len(self.losses)} updates; the "
                              "search stops with the best configuration so far", SearchWarning, stacklevel=4)
                raise _Exhausted("diverged")

    def _worst(self) -> float:
        assert self.history is not None
        finite = [r.score for r in self.history.records if math.isfinite(r.score)]
        return min(finite) if finite else 0.0

    def _to_unit(self, action: float) -> float:
        return (action - self.lower) / (self.upper - self.lower)

    def _save_policy(self) -> None:
        assert self.history is not None
        if self.history.path is not None:
            torch.save(self.agent.state_dict(), Path(f"{self.history.path}.policy.pt"))

    # the state ---------------------------------------------------------------------------------
    def state(self, t: int, earlier: list[float]) -> np.ndarray:
        """Group ``t``'s embedding: its static features, then the MACs removed so far, the MACs
        the later groups tie up and the previous action (all in [0, 1])."""
        original = max(self.space.original.macs, 1)
        removed = (original - self.space.measure(self._ratios(earlier)).macs) / original
        later = float(self.tied[t + 1:].sum()) / original
        previous = self._to_unit(earlier[-1]) if earlier else 0.0
        return np.concatenate([self.static[t], [removed, min(later, 1.0), previous]]).astype(np.float32)

    def _static_features(self) -> np.ndarray:
        """Per group: position, width, kernel size and stride of its producer, MACs per
        parameter it ties up (a convolution's output size), MACs tied up (min-max normalised)."""
        original = self.space.original
        cut = [self.space.measure(self.space.clip({g: self.upper})) for g in self.order]
        self.tied = np.array([original.macs - m.macs for m in cut], dtype=np.float64)
        tied_params = np.array([original.params - m.params for m in cut], dtype=np.float64)
        groups = {g.index: g for g in self.space.groups}
        rows = []
        for t, index in enumerate(self.order):
            kernel, stride = self._producer(groups[index])
            rows.append([t, len(groups[index]), kernel, stride, self.tied[t] / max(tied_params[t], 1.0), self.tied[t]])
        table = np.asarray(rows, dtype=np.float64)
        span = table.max(0) - table.min(0)
        return ((table - table.min(0)) / np.where(span > 0, span, 1.0)).astype(np.float32)

    def _producer(self, group: Any) -> tuple[float, float]:
        """(kernel size, stride) of the first layer whose weight rows hold the group (1, 1 for a Linear)."""
        modules = dict(self.space.graph.model.named_modules())
        for name, dim in group.params:
            module = modules.get(name.rpartition(".")[0])
            if dim == 0 and name.endswith("weight") and isinstance(module, nn.modules.conv._ConvNd):
                return float(np.prod(module.kernel_size)), float(module.stride[0])
        return 1.0, 1.0

    def _check_upper_reaches_budget(self) -> None:
        least = self.space.measure(self._ratios([], tail=self.upper))
        quantity = self.space.quantity
        if quantity is not None and not self.space.meets(least):
            raise ValueError(f"AMC: with every group cut by upper={self.upper} the model keeps "
                             f"{least.get(quantity):.6g} {quantity}, over the budget "
                             f"{self.space.budget():.6g}; raise upper or loosen the budget")
