"""Unstructured level pruning: exactly the smallest weights, masks that survive training, compact export."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim
from torchslim.sparsity import load_sparse, save_sparse, sparsify_, sparsity_report


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_level_pruning_zeroes_exactly_the_smallest_weights():
    net = model()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    torchslim.sparsify_(net, 0.3)
    for name in ("0.weight", "3.weight"):
        w = before[name].flatten()
        k = int(0.3 * w.numel())
        smallest = set(torch.argsort(w.abs(), stable=True)[:k].tolist())
        zeroed = set((dict(net.named_parameters())[name].flatten() == 0).nonzero().flatten().tolist())
        assert zeroed == smallest
    assert torch.equal(net[0].bias, before["0.bias"])  # biases untouched


def test_global_scope_uses_one_threshold():
    net = model()
    with torch.no_grad():
        net[3].weight.mul_(10)  # layers of different scale: global pruning takes unevenly
    weights = torch.cat([net[0].weight.detach().abs().flatten(), net[3].weight.detach().abs().flatten()])
    threshold = torch.sort(weights).values[int(0.3 * weights.numel()) - 1]
    expected = {"0.weight": float((net[0].weight.abs() <= threshold).float().mean()),
                "3.weight": float((net[3].weight.abs() <= threshold).float().mean())}
    sparsify_(net, 0.3, scope="global")
    report = {r.name: r.sparsity for r in sparsity_report(net)}
    assert report == pytest.approx(expected)
    assert report["0.weight"] > 0.5 > report["3.weight"]


def test_masks_survive_adam_training():
    net = model()
    masks = sparsify_(net, 0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    masks.attach(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
        optimizer.step()
    for name, keep in masks.masks.items():
        param = dict(net.named_parameters())[name]
        assert torch.all(param[~keep] == 0)
        assert torch.all(optimizer.state[param]["exp_avg"][~keep] == 0)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)


def test_sparse_export_is_smaller_and_round_trips(tmp_path):
    net = model()
    sparsify_(net, 0.8)
    sizes = save_sparse(net, tmp_path / "w.safetensors")
    assert sizes["file_bytes"] < 0.6 * sizes["dense_bytes"]
    fresh = model()
    load_sparse(fresh, tmp_path / "w.safetensors")
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_invalid_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        sparsify_(model(), 1.0)
    with pytest.raises(ValueError, match="no layer"):
        sparsify_(model(), 0.3, op_names=["nothing"])
