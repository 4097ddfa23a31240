"""Each criterion's choice against an independent computation on small crafted models."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.criteria import bn_l1_penalty
from torchslim.criteria.lamp import lamp_scores


def two_convs(first: torch.Tensor) -> nn.Sequential:
    """conv(3 -> n) -> conv(n -> 2): the n channels are one group; conv2 columns are equal."""
    n = first.shape[0]
    model = nn.Sequential(nn.Conv2d(3, n, 1, bias=False), nn.Conv2d(n, 2, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(first.view(n, 3, 1, 1))
        model[1].weight.fill_(0.1)
    return model


def kept_filters(model: nn.Module, original_first: torch.Tensor) -> set[int]:
    kept = model[0].weight.detach().view(model[0].weight.shape[0], -1)
    return {i for i, row in enumerate(original_first) if any(torch.equal(row, k) for k in kept)}


def prune(model, criterion, ratio=0.5, **kwargs):
    return torchslim.prune_(model, torch.randn(1, 3, 4, 4), torchslim.PruneConfig(ratio=ratio, criterion=criterion), **kwargs)


def test_l1_and_l2_keep_different_filters():
    # filters 0,1: one large weight (high L2, low L1); filters 2,3: three medium weights (high L1, low L2)
    first = torch.tensor([[3.0, 0, 0], [0, 3.1, 0], [1.2, 1.2, 1.2], [1.3, 1.3, 1.3]])
    l1_model, l2_model = two_convs(first), two_convs(first)
    prune(l1_model, "l1")
    prune(l2_model, "l2")
    assert kept_filters(l1_model, first) == {2, 3}  # L1: 3.6, 3.9 > 3.0, 3.1
    assert kept_filters(l2_model, first) == {0, 1}  # L2: 3.0, 3.1 > 2.08, 2.25


def test_fpgm_prunes_the_filter_nearest_the_geometric_median():
    first = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [1.4, 1.3, 1.3]])  # row 3 sits in the middle
    model = two_convs(first)
    prune(model, "fpgm", ratio=0.25)
    distances = torch.cdist(first, first).sum(1)
    assert kept_filters(model, first) == set(range(4)) - {int(distances.argmin())} == {0, 1, 2}


def test_bn_scale_keeps_largest_gammas_and_penalty_is_l1():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    gammas = torch.tensor([0.1, -2.0, 0.05, 1.5])
    with torch.no_grad():
        model[1].weight.copy_(gammas)
    prune(model, "bn_scale")
    assert sorted(model[1].weight.detach().tolist()) == sorted([-2.0, 1.5])
    assert torch.isclose(bn_l1_penalty(model, 0.5), 0.5 * model[1].weight.abs().sum())


def test_apoz_prunes_channels_with_most_zeros():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(0.1)
        model[0].bias.copy_(torch.tensor([2.0, -2.0, 0.0, -5.0]))  # channels 1 and 3 are almost always zero
    data = [torch.randn(8, 3, 4, 4) for _ in range(3)]
    with torch.no_grad():
        zeros = torch.stack([(model[1](model[0](x)) == 0).float().mean((0, 2, 3)) for x in data]).mean(0)
    prune(model, "apoz", data=data)
    expected_kept = set(torch.argsort(zeros)[:2].tolist())
    assert expected_kept == {0, 2}
    assert sorted(model[0].bias.detach().tolist()) == sorted([2.0, 0.0])


def test_mean_activation_keeps_the_loudest_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.5, 3.0, 0.1, 2.0]))
    prune(model, "mean_activation", data=[torch.randn(4, 3, 4, 4)])
    assert sorted(model[0].bias.detach().tolist()) == [2.0, 3.0]


def test_taylor_uses_real_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3)).eval()
    reference = copy.deepcopy(model)
    batches = [(torch.randn(4, 3, 4, 4), torch.randint(0, 3, (4,))) for _ in range(2)]
    # independent: accumulate w * dL/dw over the batches with autograd
    totals = [torch.zeros_like(p) for p in reference.parameters()]
    for x, y in batches:
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        for total, p in zip(totals, reference.parameters()):
            total += p.detach() * p.grad
    w, b, lin_w, _ = totals
    # per slot and index |sum of the slice|, summed over the channel's indices (conv row, bias, 16 linear columns)
    per_channel = w.sum((1, 2, 3)).abs() + b.abs() + lin_w.sum(0).abs().view(6, 16).sum(1)
    original_rows = model[0].weight.detach().clone()
    prune(model, "taylor", data=batches, loss_fn=lambda out, batch: F.cross_entropy(out, batch[1]))
    kept = {i for i in range(6) if any(torch.equal(original_rows[i], k) for k in model[0].weight.detach())}
    assert kept == set(torch.argsort(per_channel, descending=True)[:3].tolist())


def test_fisher_squares_each_batch_group_sum():
    """Molchanov's group Taylor: per batch (sum of w*g over the channel's conv row, bias and linear
    columns)^2, averaged; signs that cancel across batches in 'taylor' do not cancel here."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3)).eval()
    reference = copy.deepcopy(model)
    batches = [(torch.randn(4, 3, 4, 4), torch.randint(0, 3, (4,))) for _ in range(3)]
    squares = torch.zeros(6)
    for x, y in batches:
        reference.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        w, b, lin_w = (p.detach() * p.grad for p in list(reference.parameters())[:3])
        squares += (w.sum((1, 2, 3)) + b + lin_w.sum(0).view(6, 16).sum(1)) ** 2
    original_rows = model[0].weight.detach().clone()
    prune(model, "fisher", data=batches, loss_fn=lambda out, batch: F.cross_entropy(out, batch[1]))
    kept = {i for i in range(6) if any(torch.equal(original_rows[i], k) for k in model[0].weight.detach())}
    assert kept == set(torch.argsort(squares, descending=True)[:3].tolist())


def test_fisher_with_random_projections_needs_no_labels():
    """A channel the output does not depend on (zero outgoing weights) scores zero and goes first."""
    from torchslim.criteria import random_projection_loss

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[2].weight[:, 1] = 0
    batches = [torch.randn(2, 3, 4, 4) for _ in range(4)]
    before = model[0].weight.detach().clone()
    prune(model, "fisher", ratio=0.25, data=batches, loss_fn=random_projection_loss())
    assert model[0].out_channels == 3 and not any(torch.equal(before[1], k) for k in model[0].weight.detach())


def test_lamp_scores_formula():
    squared = torch.tensor([4.0, 1.0, 9.0])
    # sorted ascending: 1, 4, 9 -> 1/14, 4/13, 9/9
    assert torch.allclose(lamp_scores(squared), torch.tensor([4 / 13, 1 / 14, 1.0]))


def test_data_driven_criteria_need_data():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    for criterion in ("taylor", "apoz"):
        try:
            prune(model, criterion)
        except ValueError as exc:
            assert criterion in str(exc) and "data=" in str(exc)
        else:
            raise AssertionError(f"{criterion} ran without data")


@pytest.mark.parametrize("p", [1, 2])
def test_norm_scores_equal_the_sum_over_every_coupled_slice_and_follow_weight_updates(p):
    """An atom's Lp score is (sum over its slices in every coupled tensor of |w|^p)^(1/p): the
    conv's output filter and bias, the BatchNorm's scale and shift, the next conv's input
    column. Changing a weight in place changes the score (sums are not served stale)."""
    from torchslim.criteria import make_importance
    from torchslim.graph import DependencyGraph

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    graph = DependencyGraph.build(model, torch.randn(1, 3, 8, 8))
    importance = make_importance("l1" if p == 1 else "l2", 0)

    def reference() -> list[torch.Tensor]:
        w = [m.weight.detach().abs() ** p for m in (model[0], model[3], model[5])]
        first = w[0].sum((1, 2, 3)) + model[0].bias.detach().abs() ** p + model[1].weight.detach().abs() ** p \
            + model[1].bias.detach().abs() ** p + w[1].sum((0, 2, 3))
        second = w[1].sum((1, 2, 3)) + model[3].bias.detach().abs() ** p + w[2].sum((0, 2, 3))
        return [first ** (1 / p), second ** (1 / p)]

    groups = sorted(graph.groups, key=len, reverse=True)
    assert [len(g) for g in groups] == [8, 6]
    for group, expected in zip(groups, reference()):
        assert np.allclose(importance(graph, group), expected.double().numpy(), rtol=1e-5)
    with torch.no_grad():
        model[3].weight[:, 2].mul_(10)  # column 2 of conv2: channel 2 of the first group
    for group, expected in zip(groups, reference()):
        assert np.allclose(importance(graph, group), expected.double().numpy(), rtol=1e-5)
