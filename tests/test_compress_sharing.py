"""Weight sharing (Deep Compression): k-means against an independent computation, the centroid
gradient is the sum of its members' gradients, zeros stay zero, bad input changes nothing."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.compress import kmeans_1d, remove_sharing_, restore_sharing_, share_weights_, sharing_of
from torchslim.compress.kmeans import initial_centroids
from torchslim.sparsity import mask_, sparsify_


pytestmark = pytest.mark.usefixtures("one_thread")


def lloyd_numpy(x: np.ndarray, centroids: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Lloyd's algorithm: nearest centroid by argmin of |x - c|, centroid = cluster mean."""
    c = centroids.astype(np.float64).copy()
    labels = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    for _ in range(iters):
        for j in range(len(c)):
            if np.any(labels == j):
                c[j] = x[labels == j].mean()
        new = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    for j in range(len(c)):
        if np.any(labels == j):
            c[j] = x[labels == j].mean()
    return c, labels


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 20), nn.ReLU(),
                         nn.Linear(20, 5))


def test_kmeans_hand_computed_case():
    values = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    centroids, labels = kmeans_1d(values, 2)  # linear init: 0 and 12, midpoint 6
    assert centroids.tolist() == [1.0, 11.0]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("k", [2, 5, 16])
def test_kmeans_linear_init_matches_numpy_lloyd(k):
    rng = np.random.default_rng(k)
    x = np.concatenate([rng.normal(-0.3, 0.05, 300), rng.normal(0.2, 0.1, 500), rng.laplace(0, 0.4, 200)])
    centroids, labels = kmeans_1d(torch.tensor(x, dtype=torch.float32), k, init="linear")
    x32 = torch.tensor(x, dtype=torch.float32).double().numpy()
    expected_c, expected_labels = lloyd_numpy(x32, np.linspace(x32.min(), x32.max(), k))
    order = np.argsort(expected_c, kind="stable")
    np.testing.assert_allclose(centroids.numpy(), expected_c[order], rtol=0, atol=1e-12)
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    np.testing.assert_array_equal(labels.numpy(), remap[expected_labels])


def test_density_and_random_inits():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    density = initial_centroids(x, 4, "density")
    expected = np.quantile(x.double().numpy(), [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(density.numpy(), expected, atol=1e-12)
    random = initial_centroids(x, 4, "random", torch.Generator().manual_seed(3))
    assert set(random.tolist()) <= set(x.double().tolist()) and len(set(random.tolist())) == 4
    for init in ("density", "random"):
        centroids, labels = kmeans_1d(x, 4, init=init, generator=torch.Generator().manual_seed(3))
        for j in range(4):  # every centroid is its cluster's mean
            assert float(centroids[j]) == pytest.approx(float(x.double()[labels == j].mean()), abs=1e-12)


def test_share_weights_replaces_weights_by_centroids_and_keeps_zeros():
    model = net()
    sparsify_(model, 0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layers = share_weights_(model, {"conv": 2, "linear": 3})
    assert [(s.name, s.bits) for s in layers] == [("0.weight", 2), ("3.weight", 3), ("5.weight", 3)]
    for name, bits in (("0", 2), ("3", 3), ("5", 3)):
        old = before[f"{name}.weight"]
        new = model.get_submodule(name).weight.detach()
        assert torch.equal(new == 0, old == 0)  # zeros exactly where pruned, nowhere else
        kept = old[old != 0].double()
        centroids, labels = kmeans_1d(kept, 2 ** bits)
        expected = centroids.to(old.dtype)[labels]
        assert torch.equal(new[old != 0], expected)
        assert torch.unique(new[old != 0]).numel() <= 2 ** bits


def test_centroid_gradient_is_sum_of_member_gradients_and_zeros_stay_zero():
    model = net()
    sparsify_(model, 0.6)
    share_weights_(model, {"linear": 3, "conv": 2})
    x = torch.randn(7, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    # independent: the same function with a plain dense weight, its gradient summed per cluster
    plain = copy.deepcopy(model)
    remove_sharing_(plain)
    plain(x).square().sum().backward()
    model(x).square().sum().backward()
    for name, (codebook, index) in sharing_of(model).items():
        module = model.get_submodule(name.rpartition(".")[0])
        grad = module.parametrizations.weight.original.grad
        dense_grad = plain.get_submodule(name.rpartition(".")[0]).weight.grad
        expected = torch.stack([dense_grad[index == j].sum() for j in range(codebook.numel())])
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    zeros = {name: model.get_submodule(name.rpartition(".")[0]).weight == 0 for name in sharing_of(model)}
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        model(x).square().sum().backward()
    for name, (codebook, index) in sharing_of(model).items():
        weight = model.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.equal(weight == 0, zeros[name])  # zeros stay zero, nothing else becomes zero
        assert torch.equal(weight[index < codebook.numel()], codebook[index[index < codebook.numel()]])


def test_state_dict_restore_and_bake():
    model = net()
    share_weights_(model, 2)
    state = model.state_dict()
    assert "3.parametrizations.weight.original" in state and "3.parametrizations.weight.0.index" in state
    other = net()
    restore_sharing_(other, sharing_of(model))
    other.load_state_dict(state)
    x = torch.randn(3, 2, 6, 6)
    assert torch.equal(other(x), model(x))
    expected = model(x)
    remove_sharing_(model)
    assert isinstance(model[3].weight, nn.Parameter) and not hasattr(model[3], "parametrizations")
    assert torch.equal(model(x), expected)
    copied = copy.deepcopy(other)
    remove_sharing_(copied)  # a deep copy keeps its own class: the original stays shared
    assert torch.equal(other(x), expected)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, True, "4"])
def test_bits_outside_range_refused_and_nothing_changed(bits):
    model = net()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"bits for .* integer in \[1, 16\]"):
        share_weights_(model, {"conv": 2, "linear": bits})
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_too_few_distinct_weights_refused_naming_the_layer_nothing_changed():
    model = net()
    with torch.no_grad():
        model[5].weight.copy_(torch.tensor([0.5, -0.5, 0.0, 0.25]).repeat(25)[: 100].view(5, 20))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'5\.weight' has 3 distinct non-zero weights, fewer than the 4 clusters"):
        share_weights_(model, 2)  # 0.weight and 3.weight would be fine: they must not be shared either
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_codebooks_and_masked_weights_refused():
    model = net()
    with pytest.raises(ValueError, match="no shared weights"):
        sharing_of(model)
    mask_(model, {"3.weight": model[3].weight.abs() > 0.05})
    with pytest.raises(ValueError, match=r"'3\.weight'.*remove_masks_"):
        share_weights_(model, {"linear": 2})
    assert not hasattr(model[5], "parametrizations")
    with pytest.raises(ValueError, match="no module matches 'nope'"):
        share_weights_(net(), {"nope": 2})
    with pytest.raises(ValueError, match="init must be one of"):
        share_weights_(net(), 2, init="kmeans++")


def test_assigning_a_weight_projects_it_on_the_clusters():
    model = net()
    sparsify_(model, 0.5)
    share_weights_(model, {"linear": 2})
    codebook, index = sharing_of(model)["5.weight"]
    target = torch.randn(5, 20, generator=torch.Generator().manual_seed(2))
    model[5].weight = target  # right_inverse: each centroid becomes the mean of its members' new values
    new_codebook, new_index = sharing_of(model)["5.weight"]
    assert torch.equal(new_index, index)
    for j in range(codebook.numel()):
        assert float(new_codebook[j]) == pytest.approx(float(target[index == j].mean()), abs=1e-6)
    assert bool((model[5].weight[index == codebook.numel()] == 0).all())


def test_kmeans_one_cluster_and_an_empty_cluster():
    values = torch.tensor([1.0, 2.0, 6.0])
    centroids, labels = kmeans_1d(values, 1)
    assert centroids.tolist() == [3.0] and labels.tolist() == [0, 0, 0]
    values = torch.tensor([0.0, 0.1, 0.2, 9.8, 9.9, 10.0])
    centroids, labels = kmeans_1d(values, 3)  # linear init 0, 5, 10: nothing near 5, that cluster stays empty
    assert centroids[1].item() == 5.0 and 1 not in labels.tolist()
    assert centroids[0].item() == pytest.approx(0.1) and centroids[2].item() == pytest.approx(9.9)
