"""Iterative and AGP schedules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim
from torchslim.schedules import AGPPruner, agp_sparsity, prune_iteratively


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 4)).eval()


X = torch.randn(1, 3, 8, 8)


def test_agp_follows_the_cubic_formula():
    s_i, s_f, t0, n = 0.1, 0.8, 5, 20
    for t in (0, 5, 10, 15, 25, 40):
        progress = min(max((t - t0) / n, 0), 1)
        assert agp_sparsity(t, initial=s_i, final=s_f, start=t0, steps=n) == pytest.approx(
            s_f + (s_i - s_f) * (1 - progress) ** 3)


@pytest.mark.parametrize("structured", [True, False])
def test_agp_in_a_training_loop(structured):
    model = net().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = AGPPruner(model, X, final_sparsity=0.5, total_steps=6, frequency=2, structured=structured,
                       optimizer=optimizer)
    seen = []
    for _ in range(8):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
        optimizer.step()
        seen.append(pruner.step())
        for name, keep in pruner.masks.masks.items():  # masks hold after each optimizer step
            assert torch.all(dict(model.named_parameters())[name][~keep] == 0)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(0.5)
    model.eval()
    masked_out = model(X)
    result = pruner.finalize()
    if structured:
        assert model[0].out_channels == 8 and model[3].out_channels == 16
        assert torch.allclose(model(X), masked_out, atol=1e-5)
        assert result.plan
    else:
        report = {r.name: r.sparsity for r in torchslim.sparsity_report(model)}
        assert report["0.weight"] == pytest.approx(0.5, abs=0.01)


def test_iterative_reaches_the_macs_target_with_finetuning_between_steps():
    model = net()
    calls = []
    result = prune_iteratively(model, X, torchslim.PruneConfig(target_macs=0.5), steps=3,
                               finetune=lambda m, step: calls.append(step))
    assert calls == [0, 1, 2]
    assert result.macs_after <= 0.5 * result.macs_before
    macs = [r.macs_after for r in result.steps]
    assert macs == sorted(macs, reverse=True)


def test_iterative_ratio_compounds():
    model = net()
    prune_iteratively(model, X, torchslim.PruneConfig(ratio=0.75), steps=2)
    assert model[0].out_channels == 4  # 16 * 0.5 * 0.5


def test_step_configs_for_a_macs_target_needs_the_original_macs():
    from torchslim.schedules import step_configs

    with pytest.raises(ValueError, match="a MACs target needs macs_before"):
        step_configs(torchslim.PruneConfig(target_macs=0.5), 2)
    fractions = [c.target_macs for c in step_configs(torchslim.PruneConfig(target_macs=0.5), 2, macs_before=1000)]
    assert fractions == [750.0, 500.0]


def test_agp_finalize_with_the_last_loss_still_alive_trains_on():
    # the loop's last `loss` keeps its graph, and with it autograd's accumulator nodes that know
    # the parameters' unpruned shapes: the next backward must not run into them
    model = net().train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    pruner = AGPPruner(model, X, final_sparsity=0.5, total_steps=2, optimizer=optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
        loss.backward()
        optimizer.step()
        pruner.step()
    pruner.finalize()
    assert model[0].out_channels == 8
    optimizer.zero_grad()
    model(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
    optimizer.step()
    assert model[0].weight.grad.shape == model[0].weight.shape
    del loss
