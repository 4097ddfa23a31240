"""A small deep deterministic policy gradient agent (Lillicrap et al., "Continuous control with
deep reinforcement learning", ICLR 2016) for AMC's per-layer actions: actor and critic MLPs,
target copies updated softly, a replay buffer, truncated-normal exploration noise and a
moving-average reward baseline. Independent of pruning; seeded, so the same seed and the same
rewards give the same actions (what a resumed search relies on)."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
from scipy.stats import truncnorm
from torch import nn


@dataclasses.dataclass(frozen=True)
class DDPGConfig:
    """Hyper-parameters (AMC's defaults: 300 hidden units, actor lr 1e-4, critic lr 1e-3, tau
    0.01, batch 64, discount 1; the reward baseline moves by ``baseline_rate`` per update)."""

    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    tau: float = 0.01
    discount: float = 1.0
    batch_size: int = 64
    buffer_size: int = 2000
    baseline_rate: float = 0.5
    every_step: bool = True

    def check(self) -> None:
        """Raise ``ValueError`` on settings the agent cannot train with."""
        if self.hidden < 1 or self.batch_size < 1 or self.buffer_size < self.batch_size:
            raise ValueError(f"need hidden >= 1, batch_size >= 1 and buffer_size >= batch_size; got {self.hidden}, "
                             f"{self.batch_size}, {self.buffer_size}")
        for name in ("actor_lr", "critic_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.tau <= 1 or not 0 <= self.discount <= 1 or not 0 < self.baseline_rate <= 1:
            raise ValueError(f"need tau in (0, 1], discount in [0, 1] and baseline_rate in (0, 1]; got {self.tau}, "
                             f"{self.discount}, {self.baseline_rate}")


def _mlp(inputs: int, hidden: int, last: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, 1)]
    return nn.Sequential(*layers, *([last] if last is not None else []))


class ReplayBuffer:
    """A ring buffer of (state, action, reward, next state, done) transitions."""

    def __init__(self, capacity: int, state_dim: int):
        self.states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.next_states = np.zeros((capacity, state_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, 1), dtype=np.float32)
        self.rewards = np.zeros((capacity, 1), dtype=np.float32)
        self.done = np.zeros((capacity, 1), dtype=np.float32)
        self.capacity, self.size, self.cursor = capacity, 0, 0

    def add(self, state: np.ndarray, action: float, reward: float, next_state: np.ndarray, done: bool) -> None:
        i = self.cursor
        self.states[i], self.actions[i], self.rewards[i] = state, action, reward
        self.next_states[i], self.done[i] = next_state, float(done)
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, ...]:
        index = rng.integers(0, self.size, size=n)
        return tuple(torch.from_numpy(a[index]) for a in (self.states, self.actions, self.rewards, self.next_states,
                                                          self.done))


class DDPGAgent:
    """Actor ``mu(s)`` in [0, 1] and critic ``Q(s, a)``; :meth:`act` adds exploration noise,
    :meth:`observe` stores a transition, :meth:`update` trains both on a sampled batch and
    returns the losses (NaN when the critic diverged)."""

    def __init__(self, state_dim: int, config: DDPGConfig | None = None, *, seed: int = 0):
        self.config = config or DDPGConfig()
        self.config.check()
        self.rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = _mlp(state_dim, self.config.hidden, nn.Sigmoid())
            self.critic = _mlp(state_dim + 1, self.config.hidden, None)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=self.config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.config.critic_lr)
        self.buffer = ReplayBuffer(self.config.buffer_size, state_dim)
        self.baseline: float | None = None

    @torch.no_grad()
    def policy(self, state: np.ndarray) -> float:
        """The actor's action for ``state``, without noise."""
        return float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])

    def act(self, state: np.ndarray, sigma: float) -> float:
        """The actor's action plus truncated-normal noise of scale ``sigma``, kept in [0, 1]."""
        mu = self.policy(state)
        if sigma <= 0:
            return mu
        low, high = (0.0 - mu) / sigma, (1.0 - mu) / sigma
        return float(np.clip(truncnorm.rvs(low, high, loc=mu, scale=sigma, random_state=self.rng), 0.0, 1.0))

    def observe(self, state: np.ndarray, action: float, reward: float, next_state: np.ndarray, done: bool) -> None:
        self.buffer.add(state, action, reward, next_state, done)

    def update(self) -> tuple[float, float]:
        """One gradient step of critic and actor on a sampled batch, then the soft target update."""
        cfg = self.config
        if self.buffer.size == 0:
            return 0.0, 0.0
        states, actions, rewards, next_states, done = self.buffer.sample(self.rng, cfg.batch_size)
        finals = rewards[self._rewarded(done) > 0]
        if finals.numel():  # the reward comes at the end of an episode: the baseline tracks those
            mean = float(finals.mean())
            self.baseline = mean if self.baseline is None else (1 - cfg.baseline_rate) * self.baseline + \
                cfg.baseline_rate * mean
        rewards = rewards - (self.baseline or 0.0) * self._rewarded(done)
        with torch.no_grad():
            next_q = self.critic_target(torch.cat([next_states, self.actor_target(next_states)], 1))
            target = rewards + cfg.discount * (1 - done) * next_q
        critic_loss = nn.functional.mse_loss(self.critic(torch.cat([states, actions], 1)), target)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()
        actor_loss = -self.critic(torch.cat([states, self.actor(states)], 1)).mean()
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self.actor_optimizer.step()
        self._soft_update()
        losses = float(critic_loss.detach()), float(actor_loss.detach())
        return losses if all(math.isfinite(v) for v in losses) else (math.nan, math.nan)

    def _rewarded(self, done: torch.Tensor) -> torch.Tensor:
        """Where transitions carry the episode's reward: every step (``every_step``), else the last."""
        return torch.ones_like(done) if self.config.every_step else done

    @torch.no_grad()
    def _soft_update(self) -> None:
        tau = self.config.tau
        for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            for p, q in zip(net.parameters(), target.parameters()):
                q.mul_(1 - tau).add_(p, alpha=tau)

    def state_dict(self) -> dict[str, dict]:
        """The four networks' weights (the trained policy is ``actor``)."""
        return {name: getattr(self, name).state_dict()
                for name in ("actor", "critic", "actor_target", "critic_target")}
