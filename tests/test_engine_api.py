"""The public engine API: a removal planned as data, applied and rolled back as a context.

A search evaluates many candidate removals on one model; each must leave the model exactly as
it was (same Parameter objects, bit-identical data, same module attributes), and inside the
context the model must compute what the original with the removed channels zeroed computes.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from torchslim.graph import DependencyGraph
from torchslim.pruning import applied, channel_order, plan_removal, zero_removed_

torchvision = pytest.importorskip("torchvision")


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval(), (torch.randn(1, 3, 32, 32),)


def _vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    return model.eval(), (torch.randn(1, 3, 32, 32),)


def _modnet():
    from torchslim.models import create_model

    torch.manual_seed(0)
    return create_model("modnet").eval(), (torch.randn(1, 3, 64, 64), False)


MODELS = {"resnet": _resnet, "vit": _vit, "modnet": _modnet}


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so a mix-up of kept indices shows in the outputs."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _candidate(graph: DependencyGraph) -> np.ndarray:
    """The least important quarter (by L1) of every exact group."""
    parts = [channel_order(graph, g, "l1")[: len(g) // 4] for g in graph.groups if g.exact and len(g) >= 4]
    return np.concatenate(parts)


def _snapshot(model: nn.Module) -> dict:
    """Every tensor (object, storage pointer, bits) and every plain module attribute."""
    tensors = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        tensors[name] = (id(t), t.data_ptr(), t.detach().clone(), t.stride())
    attributes = {}
    for name, m in model.named_modules():
        attributes[name] = {k: copy.copy(v) for k, v in vars(m).items()
                            if isinstance(v, (int, float, bool, str, tuple, list, type(None), torch.Size))}
    return {"tensors": tensors, "attributes": attributes}


def _assert_same(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (obj, ptr, data, stride) in before["tensors"].items():
        obj2, ptr2, data2, stride2 = after["tensors"][name]
        assert obj == obj2, f"{name}: a different tensor object"
        assert ptr == ptr2 and stride == stride2, f"{name}: different storage"
        assert data.dtype == data2.dtype and torch.equal(data.view(torch.uint8) if data.dtype == torch.bool else data, data2), \
            f"{name}: values changed"
    assert before["attributes"] == after["attributes"]


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_and_rollback_100_times_is_bit_identical(name):
    model, inputs = MODELS[name]()
    _randomize_bn(model)
    graph = DependencyGraph.build(model, inputs)
    removed = _candidate(graph)
    assert removed.size > 0
    before = _snapshot(model)
    plan = plan_removal(graph, removed)
    _assert_same(before, _snapshot(model))  # planning touches nothing
    for _ in range(100):
        with applied(graph, plan):
            pass
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("name", list(MODELS))
def test_plan_matches_what_applying_produces_and_is_exact(name):
    model, inputs = MODELS[name]()
    _randomize_bn(model)
    graph = DependencyGraph.build(model, inputs)
    removed = _candidate(graph)
    zeroed = copy.deepcopy(model)
    zero_removed_(zeroed, {n: {d: g.tolist() for d, g in dims.items()} for n, dims in graph.removal(removed).items()})
    with torch.no_grad():
        expected = zeroed(*inputs)
    before = _snapshot(model)
    plan = plan_removal(graph, removed)
    assert plan.shapes and plan.attributes
    with applied(graph, removed) as done:
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        for tensor_name, shape in done.shapes.items():
            assert tuple(tensors[tensor_name].shape) == shape, tensor_name
        for module_name, attrs in plan.attributes.items():
            module = model.get_submodule(module_name)
            for attr, value in attrs.items():
                assert getattr(module, attr) == value, f"{module_name}.{attr}"
        with torch.no_grad():
            got = model(*inputs)
    for e, g in zip(_flat(expected), _flat(got)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    _assert_same(before, _snapshot(model))


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in _flat(o)]


def test_rollback_on_error_inside_the_context():
    model, inputs = _resnet()
    graph = DependencyGraph.build(model, inputs)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with applied(graph, _candidate(graph)):
            raise RuntimeError("evaluation failed")
    _assert_same(before, _snapshot(model))


def test_gradients_of_sliced_tensors_come_back():
    model, inputs = _resnet()
    model(*inputs).sum().backward()
    graph = DependencyGraph.build(model, inputs)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with applied(graph, _candidate(graph)) as plan:
        model(*inputs).sum().backward()  # sliced tensors: gradients of the pruned shape, dropped on exit
    assert plan.shapes
    for n, p in model.named_parameters():
        if n in plan.shapes:
            assert torch.equal(p.grad, grads[n]), n


def test_channel_order_follows_the_criterion():
    model, inputs = _resnet()
    graph = DependencyGraph.build(model, inputs)
    group = max(graph.groups, key=len)
    scores = np.random.default_rng(0).permutation(len(group)).astype(float)
    order = channel_order(graph, group, lambda g, grp: scores)
    np.testing.assert_array_equal(order, group.atoms[np.argsort(scores)])
    l1 = channel_order(graph, group, "l1")
    assert sorted(l1.tolist()) == sorted(group.atoms.tolist())
    with pytest.raises(ValueError, match=f"group {group.index}"):
        channel_order(graph, group, lambda g, grp: np.zeros(2))


def test_ratios_address_a_group_by_id():
    import torchslim

    model, inputs = _resnet()
    graph = DependencyGraph.build(model, inputs)
    group = max((g for g in graph.groups if g.exact), key=len)
    name, dim = group.params[0]
    width = graph.atom_width(group)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.0, ratios={group.index: 0.5}))
    removed = result.plan.removed
    assert removed, "the group given by id lost nothing"
    assert set(removed) <= {n for n, _ in group.params}, "another group was pruned"
    assert len(removed[name][dim]) == len(group) // 2 * width
    with pytest.raises(ValueError, match=r"PruneConfig.ratios\[9999\] names no group"):
        torchslim.prune_(_resnet()[0], inputs, torchslim.PruneConfig(ratio=0.0, ratios={9999: 0.5}))


def test_remove_takes_exactly_the_atoms_given_records_them_and_refuses_pinned_ones(tmp_path):
    import torchslim
    from torchslim.pruning import PruningError, remove_

    model, x = _resnet()
    original = copy.deepcopy(model)
    graph = DependencyGraph.build(model, x)
    chosen = np.concatenate([channel_order(graph, g, "l1")[-3:] for g in graph.groups[:2]])  # the most important
    expected = graph.removal(chosen)
    result = remove_(graph, chosen, x)
    assert result.plan.removed == {n: {d: idx.tolist() for d, idx in dims.items()} for n, dims in expected.items()}
    assert torchslim.verify(original, model, x, result.plan).ok and result.macs_after < result.macs_before
    torchslim.save(model, tmp_path / "ck")
    assert torch.equal(torchslim.load(tmp_path / "ck", _resnet()[0])(*x), model(*x))
    fresh, _ = _resnet()
    graph = DependencyGraph.build(fresh, x)
    pinned = np.flatnonzero(graph.atom_pinned)[:1]
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PruningError, match="pinned"):
        remove_(graph, pinned, x)
    with pytest.raises(ValueError, match="labels of the graph"):
        remove_(graph, np.array([graph.n_atoms]), x)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
