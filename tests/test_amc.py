"""AMC: the DDPG agent learns a synthetic per-layer allocation whose best is known; clipped
actions always leave the budget reachable (property test over random conv chains and budgets);
on a real search every candidate meets the budget, a resumed search ends exactly as an
uninterrupted one, a diverging critic stops the search with the best so far, and bad options
are refused before anything runs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchslim.search import AMCSearch, DDPGConfig, SearchWarning
from torchslim.search._ddpg import DDPGAgent

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ddpg_learns_a_known_per_layer_allocation():
    """Four 'layers', reward -sum (a_t - target_t)^2: the policy's actions end within 0.2 of the
    targets (0.1 on average) after 300 episodes, where uniform random actions miss by 0.3 on average."""
    targets = np.array([0.2, 0.7, 0.4, 0.9])
    agent = DDPGAgent(2, DDPGConfig(hidden=64, actor_lr=1e-3, critic_lr=3e-3, tau=0.05), seed=1)
    rng, sigma = np.random.default_rng(1), 0.5

    def state(t: int, previous: float) -> np.ndarray:
        return np.array([t / 3, previous], dtype=np.float32)

    for episode in range(300):
        previous, steps = 0.0, []
        for t in range(4):
            s = state(t, previous)
            previous = float(rng.uniform()) if episode < 50 else agent.act(s, sigma)
            steps.append((s, previous))
        reward = -float(((np.array([a for _, a in steps]) - targets) ** 2).sum())
        for t, (s, a) in enumerate(steps):
            agent.observe(s, a, reward, steps[min(t + 1, 3)][0], t == 3)
        if episode >= 50:
            sigma *= 0.99
            for _ in range(16):
                agent.update()
    previous, actions = 0.0, []
    for t in range(4):
        previous = agent.policy(state(t, previous))
        actions.append(previous)
    error = np.abs(np.array(actions) - targets)
    assert error.max() < 0.2 and error.mean() < 0.1


def _chain(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for cin, cout in zip([3] + widths[:-1], widths):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 4)).eval()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(4, 24), min_size=2, max_size=5), budget=st.floats(0.15, 0.9),
       actions=st.lists(st.floats(0.0, 0.8), min_size=5, max_size=5), quantity=st.sampled_from(["macs", "params"]))
def test_clipped_actions_always_leave_the_budget_reachable(widths, budget, actions, quantity):
    torch.manual_seed(0)
    search = AMCSearch(_chain(widths), torch.randn(1, 3, 8, 8), lambda m: 0.0, episodes=2, warmup=1,
                       **{f"target_{quantity}": budget})
    chosen: list[float] = []
    for t in range(len(search.order)):
        chosen.append(search.clip(t, chosen, actions[t]))
        assert chosen[-1] >= actions[t] - 1e-12 and chosen[-1] <= search.upper
        rest = search._ratios(chosen, tail=search.upper)  # the later groups can still meet it
        assert search.space.meets(search.space.measure(rest))
    assert search.space.meets(search.space.measure(search._ratios(chosen)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.fc(x.mean((2, 3)))


def _keep_a(model: nn.Module) -> float:
    """Higher the more of a's channels are kept: the best allocation cuts b and c instead."""
    return float(model.a.out_channels)


def test_every_candidate_meets_the_budget_and_the_policy_is_saved(tmp_path):
    search = AMCSearch(Net(), torch.randn(1, 3, 8, 8), _keep_a, target_macs=0.4, episodes=30, warmup=10,
                       history=tmp_path / "amc.jsonl")
    result = search.run()
    assert len(result.history) == 30 and all(r.meets_budget for r in result.history)
    assert all(0.36 <= r.macs / result.original.macs <= 0.4 for r in result.history)
    assert result.score == max(r.score for r in result.history)
    policy = torch.load(tmp_path / "amc.jsonl.policy.pt")
    assert set(policy) == {"actor", "critic", "actor_target", "critic_target"}


def test_a_resumed_search_ends_exactly_as_an_uninterrupted_one(tmp_path):
    x = torch.randn(1, 3, 8, 8)
    whole = AMCSearch(Net(), x, _keep_a, target_macs=0.4, episodes=14, warmup=4, seed=3).run()
    first = AMCSearch(Net(), x, _keep_a, target_macs=0.4, episodes=14, warmup=4, seed=3, max_evals=8,
                      history=tmp_path / "h.jsonl").run()
    assert first.stopped == "max_evals"
    calls = []
    resumed = AMCSearch(Net(), x, lambda m: calls.append(1) or _keep_a(m), target_macs=0.4, episodes=14, warmup=4,
                        seed=3, resume=tmp_path / "h.jsonl").run()
    assert len(calls) == 6  # only the episodes not recorded were evaluated
    assert [r.ratios for r in resumed.history] == [r.ratios for r in whole.history]
    assert resumed.ratios == whole.ratios


def test_a_diverging_critic_stops_with_the_best_so_far(monkeypatch):
    search = AMCSearch(Net(), torch.randn(1, 3, 8, 8), _keep_a, target_macs=0.4, episodes=20, warmup=3)
    monkeypatch.setattr(search.agent, "update", lambda: (math.nan, math.nan))
    with pytest.warns(SearchWarning, match="diverged"):
        result = search.run()
    assert result.stopped == "diverged" and len(result.history) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"episodes": 0}, "episodes"), ({"episodes": 5, "warmup": 5}, "warmup"), ({"lower": 0.5, "upper": 0.4}, "lower"),
    ({"upper": 0.99}, "upper"), ({"sigma": -1.0}, "sigma"), ({"sigma_decay": 0.0}, "sigma_decay"),
    ({"updates_per_episode": 0}, "updates_per_episode"), ({"ddpg": DDPGConfig(tau=2.0)}, "tau"),
])
def test_bad_options_are_refused_before_anything_runs(kwargs, message):
    class Untraceable(nn.Module):
        def forward(self, x):
            raise AssertionError("nothing may run")

    with pytest.raises(ValueError, match=message):
        AMCSearch(Untraceable(), torch.randn(1), lambda m: 0.0, target_macs=0.5, **kwargs)


def test_needs_a_budget_the_upper_bound_can_reach():
    with pytest.raises(ValueError, match="needs a budget"):
        AMCSearch(Net(), torch.randn(1, 3, 8, 8), _keep_a)
    with pytest.raises(ValueError, match="raise upper"):
        AMCSearch(Net(), torch.randn(1, 3, 8, 8), _keep_a, target_macs=0.2, upper=0.3)
