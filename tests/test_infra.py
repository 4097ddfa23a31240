"""Shared infrastructure (issue 12): training flags put back exactly, one MAC counter, one
reader of convolution arguments, logging of what the library skips, no scipy on the way."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim
from torchslim.latency import measure_model
from torchslim.modes import training_mode


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))


X = torch.randn(2, 3, 12, 12)


def mixed_net() -> nn.Module:
    """A small CNN whose submodules are deliberately in different modes: the root training,
    the first BatchNorm frozen in eval, the dropout in eval, the second block training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.1),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    model.train()
    model[1].eval()
    model[3].eval()
    return model


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_training_mode_restores_mixed_flags_also_on_exceptions():
    model = mixed_net()
    before = flags(model)
    with training_mode(model, False):
        assert not any(flags(model).values())
    assert flags(model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with training_mode(model, True):
            assert all(flags(model).values())
            raise RuntimeError("inside")
    assert flags(model) == before


def test_mixed_flags_survive_prune_verify_analyze_and_a_data_criterion():
    model = mixed_net()
    before = flags(model)
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.25))
    assert flags(model) == before
    torchslim.verify(original, model, X, result.plan)
    assert flags(model) == before and flags(original) == before
    torchslim.analyze(model, X, warmup=0, repeats=1, rounds=1)
    assert flags(model) == before
    data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.25, criterion="apoz"), data=data)
    assert flags(model) == before


def test_mixed_flags_survive_latency_measurement_and_a_latency_target():
    model = mixed_net()
    before = flags(model)
    measure_model(model, X, warmup=0, repeats=2)
    assert flags(model) == before
    torchslim.prune_(model, X, torchslim.PruneConfig(target_latency=0.8))
    assert flags(model) == before


def test_mixed_flags_survive_a_criterion_that_raises_while_running_data():
    model = mixed_net()
    before = flags(model)

    def batches():
        yield torch.randn(4, 3, 12, 12)
        raise RuntimeError("the data loader broke")

    with pytest.raises(Exception, match="the data loader broke"):
        torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.25, criterion="apoz"), data=batches())
    assert flags(model) == before


# connected components without scipy ------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_connected_components_match_scipys_labels(seed):
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    from torchslim.graph import connected_components

    rng = np.random.default_rng(seed)
    n = 2000
    left, right = rng.integers(0, n, 1500), rng.integers(0, n, 1500)
    chain = np.arange(0, 400, 1)  # a long path, the worst case for hooking one root per round
    left, right = np.concatenate([left, chain[:-1]]), np.concatenate([right, chain[1:]])
    expected = scipy_components(coo_matrix((np.ones(left.size), (left, right)), shape=(n, n)), directed=False)
    count, labels = connected_components(n, left, right)
    assert count == expected[0]
    assert np.array_equal(labels, expected[1])
    assert connected_components(3, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))[0] == 3


def test_first_prune_does_not_import_scipy():
    import subprocess
    import sys

    code = ("import sys, torch, torchslim; from torch import nn\n"
            "m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))\n"
            "torchslim.prune_(m, torch.randn(1, 3, 8, 8), torchslim.PruneConfig(ratio=0.5))\n"
            "print(sorted(k for k in sys.modules if k.startswith('scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
