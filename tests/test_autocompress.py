"""AutoCompress: rounds of simulated annealing (one-shot candidates, scored) then ADMM training
at the winning per-group ratios and the hard prune; every round meets its own goal, the last
the budget; the user's model is untouched; finished rounds are saved and a resumed run loads
them instead of training again; bad settings are refused before anything runs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _digits import trained_digits_cnn

import torchslim
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.pruning import zero_removed_
from torchslim.search import AutoCompress, admm_trainer
from torchslim.search.history import read_history

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    model, data = trained_digits_cnn(epochs=6)
    return model.eval(), data


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _run(model, data, **kwargs):
    X, Y, XT, YT = data
    calls = []
    train = admm_trainer([(X[i:i + 64], Y[i:i + 64]) for i in range(0, len(X), 64)], F.cross_entropy, epochs=2,
                         lr=2e-3)

    def counted(m, admm):
        calls.append(admm)
        train(m, admm)

    search = AutoCompress(model, X[:1], lambda m: _accuracy(m, X[-300:], Y[-300:]), counted, target_macs=0.25,
                          rounds=2, evals_per_round=4, update_every=10, rho=1e-2, seed=3, data=[X[:256]], recalibrate_bn=True,
                          config=torchslim.PruneConfig(latency_aware=False), **kwargs)
    return search.run(), calls


def test_rounds_meet_their_goals_and_the_budget_and_the_model_is_untouched(digits, tmp_path):
    model, data = digits
    X, XT, YT = data[0], data[2], data[3]
    before = copy.deepcopy(model.state_dict())
    result, calls = _run(model, data, history=tmp_path / "ac")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    original = estimate_macs(DependencyGraph.build(model, X[:1]))
    assert result.original_macs == original and len(calls) == 2
    assert [r.goal for r in result.rounds] == pytest.approx([0.5, 0.25])
    for rnd in result.rounds:
        assert rnd.macs <= rnd.goal * original
        assert rnd.search is not None and all(r.meets_budget for r in rnd.search.history)
    assert 0.23 * original <= result.macs <= 0.25 * original
    assert result.macs == estimate_macs(DependencyGraph.build(result.model, X[:1]))
    # ADMM drove the removed channels down before the hard prune: the compressed model keeps its accuracy
    assert _accuracy(result.model, XT, YT) > 0.85
    # round 2 searches the pruned model with caps counted from the original's widths (no compounding)
    first, second = (read_history(tmp_path / "ac" / f"round{i}.jsonl")[0]["space"] for i in (1, 2))
    assert set(first["caps"].values()) == {0.95}
    for group, cap in second["caps"].items():
        assert cap == pytest.approx(max(0.0, 1 - 0.05 * first["groups"][group] / second["groups"][group]), abs=1e-6)
    assert min(second["caps"].values()) < 0.95
    # the pruning history re-creates the compressed model from a fresh original
    saved = torchslim.save(result.model, tmp_path / "final", result.plan)
    assert len(result.plan.steps) == 2  # one removal per round
    again = torchslim.load(saved, copy.deepcopy(model)).eval()
    torch.testing.assert_close(again(XT), result.model(XT))


def test_the_hard_prune_removes_the_support_admm_trained_toward(digits):
    """The round's model is the ADMM-trained one with the last Z's zeros removed: the same
    function as zeroing them (no projection again from the final weights)."""
    model, (X, Y, XT, YT) = digits
    zeroed = []

    def train(m, admm):
        admm_trainer([(X[i:i + 64], Y[i:i + 64]) for i in range(0, len(X), 64)], F.cross_entropy, lr=2e-3)(m, admm)
        copied = copy.deepcopy(m).eval()
        zero_removed_(copied, {n: {d: i.tolist() for d, i in dims.items()}
                               for n, dims in admm.graph.removal(admm.removed_atoms).items()})
        zeroed.append(copied)

    result = AutoCompress(model, X[:1], lambda m: _accuracy(m, X[-300:], Y[-300:]), train, target_macs=0.5, rounds=1,
                          evals_per_round=2, update_every=7, rho=1e-2,
                          config=torchslim.PruneConfig(latency_aware=False)).run()
    torch.testing.assert_close(result.model(XT), zeroed[0](XT), atol=1e-4, rtol=1e-4)


def test_a_resumed_run_loads_the_finished_rounds_instead_of_training_again(digits, tmp_path):
    model, data = digits
    first, calls = _run(model, data, history=tmp_path / "ac")
    (tmp_path / "ac" / "round2" / "round.json").unlink()  # as if stopped during round 2's save
    resumed, calls_again = _run(model, data, resume=tmp_path / "ac")
    assert len(calls) == 2 and len(calls_again) == 1  # round 1 loaded, round 2 redone
    assert resumed.rounds[0].macs == first.rounds[0].macs and resumed.rounds[0].score == first.rounds[0].score
    assert resumed.macs == first.macs
    XT = data[2]
    torch.testing.assert_close(resumed.model(XT), first.model(XT))


def test_bad_settings_are_refused_before_anything_runs(digits):
    model, data = digits
    x = data[0][:1]

    def never(*_):
        raise AssertionError("nothing may run")

    for kwargs, error, message in [
        ({}, ValueError, "exactly one budget"),
        ({"target_macs": 0.5, "target_params": 0.5}, ValueError, "exactly one budget"),
        ({"target_macs": 0.5, "rounds": 0}, ValueError, "rounds"),
        ({"target_macs": 0.5, "rho": 0.0}, ValueError, "rho > 0"),
        ({"target_macs": 0.5, "rho": 0.5, "rho_max": 0.1}, ValueError, "rho_max"),
        ({"target_macs": 0.5, "update_every": 0}, ValueError, "update_every"),
        ({"target_macs": 0.5, "evals_per_round": 0}, ValueError, "evals_per_round"),
        ({"target_macs": 0.5, "annealing": {"cool_down_rate": 1.5}}, ValueError, "cool_down_rate"),
        ({"target_macs": 0.5, "annealing": {"temperature": 3}}, ValueError, "temperature"),
        ({"target_macs": 0.5, "recalibrate_bn": True}, ValueError, "needs data"),
    ]:
        with pytest.raises(error, match=message):
            AutoCompress(model, x, never, never, **kwargs)
    with pytest.raises(ValueError, match="does not ask for any reduction"):
        AutoCompress(model, x, never, never, target_params=10**9).run()
    with pytest.raises(ValueError, match="epochs"):
        admm_trainer([], F.cross_entropy, epochs=0)
