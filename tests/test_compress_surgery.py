"""Dynamic Network Surgery: thresholds from the layer statistics, a wrongly pruned weight is
spliced back (crafted case), masked weights keep learning, the update probability schedule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.compress import NetworkSurgery
from torchslim.sparsity import masks_of


pytestmark = pytest.mark.usefixtures("one_thread")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 20), nn.ReLU(),
                         nn.Linear(20, 5))


def test_thresholds_and_first_masks_from_mean_and_std_of_magnitudes():
    model = net()
    weights = {name: p.detach().numpy().copy() for name, p in model.named_parameters() if name.endswith("weight")}
    surgery = NetworkSurgery(model, {"conv": 0.5, "linear": 1.2, "5": -0.3})
    for name, c in (("0.weight", 0.5), ("3.weight", 1.2), ("5.weight", -0.3)):
        magnitude = np.abs(weights[name]).astype(np.float64)
        t = max(magnitude.mean() + c * magnitude.std(), 0.0)
        layer = surgery.layers[name]
        assert (layer.a, layer.b) == pytest.approx((0.9 * t, 1.1 * t), rel=1e-12)
        np.testing.assert_array_equal(masks_of(model)[name].numpy(), magnitude >= 0.9 * t)
    # the model computes with W * T
    x = torch.randn(3, 2, 6, 6)
    for name in surgery.layers:
        module = model.get_submodule(name.rpartition(".")[0])
        assert torch.equal(module.weight, surgery.dense(name).detach() * masks_of(model)[name])
    assert model(x).shape == (3, 5)


def test_sparsity_option_prunes_that_quantile_first():
    model = net()
    surgery = NetworkSurgery(model, sparsity=0.75)
    for mask in surgery.masks().values():
        assert 1 - float(mask.float().mean()) == pytest.approx(0.75, abs=1.5 / mask.numel() + 1e-9)


def test_target_sparsity_is_reached_exactly_at_every_update_and_follows_the_rule():
    model = net()
    targets = {"0": 0.5, "3": 0.9, "5": 0.75}
    surgery = NetworkSurgery(model, sparsity=targets, gamma=0.0, margin=0.2)
    ratio = 1.2 / 0.8
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # large steps: the weights move a lot
    generator = torch.Generator().manual_seed(3)
    for _ in range(15):
        before = {name: mask.clone() for name, mask in surgery.masks().items()}
        x = torch.randn(16, 2, 6, 6, generator=generator)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        surgery.step()
        for name, mask in surgery.masks().items():
            layer = surgery.layers[name]
            pruned = int((~mask).sum())
            assert abs(pruned - targets[name.rpartition(".")[0]] * mask.numel()) <= 1, name  # within one weight
            # independent check: the paper's rule with the reported thresholds, b = ratio * a
            assert layer.b == pytest.approx(ratio * layer.a, rel=1e-12)
            magnitude = surgery.dense(name).detach().abs().double().numpy()
            rule = (before[name].numpy() & (magnitude >= layer.a)) | (magnitude >= layer.b)
            assert np.array_equal(rule, mask.numpy()), name
    layer = surgery.layers["3.weight"]
    t = layer.a / 0.8
    magnitude = surgery.dense("3.weight").detach().abs().double()
    assert layer.c == pytest.approx((t - float(magnitude.mean())) / float(magnitude.std(correction=0)))


def test_target_sparsity_splices_a_weight_back_once_it_outgrows_a_kept_one_by_the_margin():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.5, 2.0, 0.01]]))
    model = nn.Sequential(layer)
    surgery = NetworkSurgery(model, sparsity=0.25, gamma=0.0)  # margin 0.1: b / a = 1.1 / 0.9
    assert masks_of(model)["0.weight"].tolist() == [[True, True, True, False]]
    assert (surgery.layers["0.weight"].a, surgery.layers["0.weight"].b) == pytest.approx((1.0, 1.1 / 0.9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    masks, values = [], []
    for _ in range(20):
        (-model(x)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append(float(surgery.dense("0.weight").detach()[0, 3]))
        surgery.step()
        masks.append(masks_of(model)["0.weight"][0].tolist())
    # spliced at the first value past (1.1 / 0.9) * 1.0; the weakest kept weight (1.0) is pruned instead
    first = next(i for i, v in enumerate(values) if v >= 1.1 / 0.9)
    assert values[first - 1] > 1.0  # already larger than a kept weight, but inside the margin: still pruned
    assert all(mask == [True, True, True, False] for mask in masks[:first])
    assert all(mask == [False, True, True, True] for mask in masks[first:])


def test_weight_pruned_early_is_spliced_back_when_its_gradient_pushes_it_past_b():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, 0.01]]))
    model = nn.Sequential(layer)
    surgery = NetworkSurgery(model, c=0.0, gamma=0.0)  # t = mean|w|, masks updated every step
    a, b = surgery.layers["0.weight"].a, surgery.layers["0.weight"].b
    t = np.mean([1.0, 1.0, 1.0, 0.01])
    assert (a, b) == pytest.approx((0.9 * t, 1.1 * t))
    assert masks_of(model)["0.weight"].tolist() == [[True, True, True, False]]  # 0.01 pruned
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # only the pruned weight's input is live
    spliced_at, values = None, []
    for step in range(20):
        (-model(x)).sum().backward()  # gradient -1 on the masked weight: straight through to W
        optimizer.step()
        optimizer.zero_grad()
        values.append(float(surgery.dense("0.weight").detach()[0, 3]))
        surgery.step()
        if spliced_at is None and bool(masks_of(model)["0.weight"][0, 3]):
            spliced_at = step
    expected = [0.01 + 0.1 * (i + 1) for i in range(20)]
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    first_past_b = next(i for i, v in enumerate(expected) if v >= b)
    assert spliced_at == first_past_b
    assert surgery.dense("0.weight")[0, :3].tolist() == [1.0, -1.0, 1.0]  # no input: unchanged, still kept
    assert float(model[0].weight.detach()[0, 3]) == pytest.approx(expected[-1], rel=1e-5)  # spliced: it computes again


def test_masked_weights_keep_being_updated_with_the_masked_weights_gradient():
    model = net()
    surgery = NetworkSurgery(model, c=0.5, gamma=0.0)
    masks = surgery.masks()
    dense_before = {name: surgery.dense(name).detach().clone() for name in surgery.layers}
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    # independent: the same network with plain weights W * T, gradient w.r.t. those weights
    plain = net()
    with torch.no_grad():
        for name in surgery.layers:
            plain.get_submodule(name.rpartition(".")[0]).weight.copy_(dense_before[name] * masks[name])
    plain(x).square().mean().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model(x).square().mean().backward()
    optimizer.step()
    for name in surgery.layers:
        grad = plain.get_submodule(name.rpartition(".")[0]).weight.grad
        after = surgery.dense(name).detach()
        torch.testing.assert_close(after, dense_before[name] - 0.05 * grad, rtol=1e-5, atol=1e-7)
        pruned = ~masks[name]
        assert bool(pruned.any()) and bool((after[pruned] != dense_before[name][pruned]).any())


def test_update_probability_follows_the_schedule():
    model = net()
    surgery = NetworkSurgery(model, gamma=0.01, power=0.75, seed=7)
    steps = 2000
    updated = [surgery.step() for _ in range(steps)]
    generator = torch.Generator().manual_seed(7)
    expected = [float(torch.rand((), generator=generator)) < (1 + 0.01 * i) ** -0.75 for i in range(steps)]
    assert updated == expected == surgery.decisions
    assert [surgery.probability(i) for i in (0, 100, 1000)] == pytest.approx([1.0, 2 ** -0.75, 11 ** -0.75])
    # the empirical rate follows the schedule (mean of sigma over each window, 5 sigma of a binomial)
    for start in (0, 500, 1500):
        window = range(start, start + 500)
        p = np.array([(1 + 0.01 * i) ** -0.75 for i in window])
        rate = sum(updated[i] for i in window)
        assert abs(rate - p.sum()) < 5 * np.sqrt((p * (1 - p)).sum())


def test_masks_change_only_on_update_steps():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, 0.01]]))
    model = nn.Sequential(layer)
    surgery = NetworkSurgery(model, c=0.0, gamma=1.0, power=1.0, seed=3)
    with torch.no_grad():
        surgery.dense("0.weight")[0, 3] = 5.0  # well past b: spliced at the next update, not before
    first = None
    for i in range(50):
        if surgery.step():
            first = i
            break
        assert not bool(masks_of(model)["0.weight"][0, 3])
    assert first is not None and bool(masks_of(model)["0.weight"][0, 3])


def test_finalize_bakes_zeros_or_fixes_the_masks():
    model = net()
    surgery = NetworkSurgery(model, c=0.3)
    masks = surgery.masks()
    weights = {name: surgery.dense(name).detach() * masks[name] for name in masks}
    fixed = surgery.finalize()
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    for name, keep in masks.items():
        weight = dict(model.named_parameters())[name]
        assert torch.equal(weight.detach(), weights[name]) and torch.equal(fixed.masks[name], keep)
    with pytest.raises(RuntimeError, match="after finalize"):
        surgery.step()

    model = net()
    surgery = NetworkSurgery(model, c=0.3)
    surgery.finalize(bake=False)
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    for name, keep in surgery.masks().items():
        assert bool((surgery.dense(name).grad[~keep] == 0).all())  # pruned weights stop learning


def test_bad_input_refused_nothing_changed():
    model = net()
    NetworkSurgery(model, {"linear": 1.0})
    with pytest.raises(ValueError, match=r"'3\.weight' is already parametrized"):
        NetworkSurgery(model, {"conv": 1.0, "linear": 1.0})
    assert not hasattr(model[0], "parametrizations")  # conv not masked by the failed call
    with pytest.raises(ValueError, match="no module matches 'fc9'"):
        NetworkSurgery(net(), {"fc9": 1.0})
    with pytest.raises(ValueError, match="sparsity must be in"):
        NetworkSurgery(net(), sparsity=1.0)
