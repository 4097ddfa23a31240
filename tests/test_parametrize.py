"""Masks as parametrisations: the dense weight is kept and trained, pruned weights can be spliced
back (Dynamic Network Surgery), masks bake into a plain model, and the engine refuses live ones."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchslim
from torchslim.pruning import PruningError
from torchslim.sparsity import mask_, masks_of, remove_masks_, set_mask_, update_masks_


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def random_masks(model: nn.Module, names=("conv.weight", "conv2.weight", "fc.weight"), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=gen) > 0.4 for n in names}


def snapshot(model: nn.Module):
    return type(model), {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, snap) -> None:
    cls, state = snap
    now = model.state_dict()
    assert type(model) is cls and list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


def test_output_equals_the_model_with_masked_weights_zeroed():
    model, x = net(), torch.randn(2, 3, 10, 10)
    keep = random_masks(model)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name, k in keep.items():
            w = dict(zeroed.named_parameters())[name]
            w[~k] = 0.0
    mask_(model, keep)
    assert torch.equal(model(x), zeroed(x))
    assert torch.equal(model.conv.weight, zeroed.conv.weight)
    assert set(masks_of(model)) == set(keep) and all(torch.equal(masks_of(model)[n], k) for n, k in keep.items())


def test_float_masks_of_zeros_and_ones_are_accepted():
    model, x = net(), torch.randn(2, 3, 8, 8)
    keep = random_masks(model)
    reference = copy.deepcopy(model)
    mask_(reference, keep)
    mask_(model, {n: k.to(torch.float64) for n, k in keep.items()})
    assert torch.equal(model(x), reference(x))


def _train(model: nn.Module, steps: int = 3, lr: float = 0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8, generator=gen)).pow(2).sum().backward()
        opt.step()
    return opt


def test_dense_weight_is_kept_and_only_kept_entries_train():
    model = net().train()
    keep = random_masks(model)
    dense_before = model.conv.weight.detach().clone()
    mask_(model, keep)
    original = model.conv.parametrizations.weight.original
    assert isinstance(original, nn.Parameter) and torch.equal(original, dense_before)
    _train(model)
    moved = original.detach() != dense_before
    assert moved[keep["conv.weight"]].any()  # the gradient reaches the dense weight
    assert not moved[~keep["conv.weight"]].any()  # masked entries: zero gradient, value kept
    assert torch.equal(model.conv.weight[~keep["conv.weight"]], torch.zeros(int((~keep["conv.weight"]).sum())))


def test_straight_through_update_and_splice_brings_the_learned_value_back():
    """DNS: W <- W - lr * dL/d(W*T) on every entry; a re-enabled entry reads its learned value."""
    model = net().train()
    keep = random_masks(model, names=("conv2.weight",))["conv2.weight"]
    x = torch.randn(4, 3, 8, 8)
    dense = model.conv2.weight.detach().clone()
    # the gradient with respect to the masked weight, computed on an independent copy
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv2.weight.copy_(torch.where(keep, dense, torch.zeros(())))
    reference(x).pow(2).sum().backward()
    grad_masked = reference.conv2.weight.grad

    mask_(model, {"conv2.weight": keep}, straight_through=True)
    opt = torch.optim.SGD([model.conv2.parametrizations.weight.original], lr=0.5)
    model(x).pow(2).sum().backward()
    assert torch.allclose(model.conv2.parametrizations.weight.original.grad, grad_masked, rtol=1e-5, atol=1e-7)
    opt.step()
    learned = model.conv2.parametrizations.weight.original.detach().clone()
    masked_entries = ~keep & (grad_masked != 0)
    assert masked_entries.any() and not torch.equal(learned[masked_entries], dense[masked_entries])
    assert torch.equal(model.conv2.weight[~keep], torch.zeros(int((~keep).sum())))

    index = tuple(masked_entries.nonzero()[0].tolist())
    spliced = keep.clone()
    spliced[index] = True
    set_mask_(model, "conv2.weight", spliced)
    assert model.conv2.weight[index] == learned[index] != dense[index]
    assert torch.equal(masks_of(model)["conv2.weight"], spliced)


def test_remove_masks_bakes_exactly_into_the_same_parameters():
    model, x = net(), torch.randn(2, 3, 8, 8)
    keep = random_masks(model)
    params = {n: p for n, p in model.named_parameters()}
    mask_(model, keep)
    copied = copy.deepcopy(model)
    _train(model.train(), steps=2)
    model.eval()
    expected_out = model(x)
    expected = {n: torch.where(k, dict(model.named_parameters())[n.replace(".weight", ".parametrizations.weight.original")],
                               torch.zeros(())).detach() for n, k in keep.items()}
    remove_masks_(model)
    assert not torchslim.sparsity.live_parametrizations(model) and type(model.conv) is nn.Conv2d
    assert list(model.state_dict()) == list(net().state_dict())
    for name, value in expected.items():
        assert dict(model.named_parameters())[name] is params[name]  # an optimiser keeps them
        assert torch.equal(params[name], value)
    assert torch.equal(model(x), expected_out)
    remove_masks_(copied)  # a deep copy of a masked model bakes alike, in the original order
    assert list(copied.state_dict()) == list(model.state_dict())


def test_a_deep_copy_keeps_its_masks_when_the_original_changes_its_own():
    """torch gives a deep copy the parametrized class of the original: changing the masks of one
    must not break the other."""
    model, x = net(), torch.randn(2, 3, 8, 8)
    keep = random_masks(model, names=("conv.weight",))
    mask_(model, keep)
    copied = copy.deepcopy(model)
    expected = copied(x)
    bias_keep = torch.rand(8) > 0.5
    mask_(model, {"conv.bias": bias_keep})  # adds a parametrized tensor to model.conv only
    assert torch.equal(copied(x), expected) and not hasattr(copied.conv.parametrizations, "bias")
    remove_masks_(model)
    assert torch.equal(copied(x), expected)
    assert set(masks_of(copied)) == {"conv.weight"}
    remove_masks_(copied)
    zeroed = net()
    with torch.no_grad():
        zeroed.conv.weight[~keep["conv.weight"]] = 0.0
    assert torch.equal(copied(x), zeroed(x))


def test_remove_masks_without_baking_restores_the_dense_weight_and_by_name():
    model = net()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask_(model, random_masks(model))
    remove_masks_(model, ["fc.weight"], bake=False)
    assert set(masks_of(model)) == {"conv.weight", "conv2.weight"}
    assert torch.equal(model.fc.weight, dense["fc.weight"])
    remove_masks_(model, bake=False)
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"'fc.weight' is not masked"):
        remove_masks_(model, ["fc.weight"])


def test_update_masks_replaces_the_mask_and_validates_all_first():
    model, x = net(), torch.randn(2, 3, 8, 8)
    mask_(model, random_masks(model, seed=1))
    new = random_masks(net(), seed=2)
    before = masks_of(model)
    with pytest.raises(ValueError, match=r"mask of 'fc.weight' has shape"):
        update_masks_(model, {"conv.weight": new["conv.weight"], "fc.weight": torch.ones(3, 3, dtype=torch.bool)})
    assert all(torch.equal(masks_of(model)[n], m) for n, m in before.items())
    update_masks_(model, new)
    reference = net()
    mask_(reference, new)
    assert torch.equal(model(x), reference(x))
    with pytest.raises(ValueError, match=r"'bn.weight' is not masked"):
        update_masks_(model, {"bn.weight": torch.ones(8, dtype=torch.bool)})


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.block = nn.Linear(6, 6)
        self.again = self.block  # a module registered under two names
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight  # tied weights

    def forward(self, ids):
        return self.head(torch.relu(self.again(self.block(self.emb(ids)))))


def test_tied_weights_and_shared_modules_stay_tied():
    torch.manual_seed(0)
    model, ids = Tied(), torch.tensor([[1, 4, 7, 11]])
    keep = torch.rand(12, 6) > 0.5
    keep_block = torch.rand(6, 6) > 0.5
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.emb.weight[~keep] = 0.0
        zeroed.block.weight[~keep_block] = 0.0
    mask_(model, {"head.weight": keep, "again.weight": keep_block})
    assert model.emb.parametrizations.weight.original is model.head.parametrizations.weight.original
    assert model.block is model.again and torch.equal(model.emb.weight, model.head.weight)
    assert torch.equal(model(ids), zeroed(ids))
    assert list(masks_of(model)) == ["emb.weight", "block.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(ids).sum().backward()
    opt.step()
    assert torch.equal(model.emb.weight, model.head.weight)
    remove_masks_(model)
    assert model.emb.weight is model.head.weight and model.block is model.again
    assert torch.equal(model.emb.weight[~keep], torch.zeros(int((~keep).sum())))


def test_tied_names_with_different_masks_are_refused():
    torch.manual_seed(0)
    model = Tied()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="tied"):
        mask_(model, {"emb.weight": torch.rand(12, 6) > 0.5, "head.weight": torch.rand(12, 6) > 0.5})
    assert_untouched(model, snap)


@pytest.mark.parametrize("masks, message", [
    ({"conv.weight": "ok", "nope.weight": torch.ones(1)}, "'nope.weight': Net has no module 'nope'"),
    ({"conv.weight": "ok", "conv.kernel": torch.ones(1)}, "'conv.kernel'.*no parameter 'kernel'"),
    ({"conv.weight": "ok", "bn.running_mean": torch.ones(8)}, "'bn.running_mean'.*a buffer"),
    ({"conv.weight": "ok", "fc.weight": torch.ones(4, 9, dtype=torch.bool)}, r"mask of 'fc.weight' has shape \[4, 9\]"),
    ({"conv.weight": "ok", "fc.weight": torch.full((4, 8), 0.5)}, "mask of 'fc.weight' must be boolean or hold only 0 and 1"),
    ({"conv.weight": "ok", "fc.weight": [[1] * 8] * 4}, "mask of 'fc.weight' must be a torch.Tensor"),
])
def test_bad_masks_name_the_key_and_leave_the_model_untouched(masks, message):
    model = net()
    masks = {n: (torch.ones_like(model.conv.weight, dtype=torch.bool) if isinstance(m, str) else m)
             for n, m in masks.items()}
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        mask_(model, masks)
    assert_untouched(model, snap)
    assert not torchslim.sparsity.live_parametrizations(model)


def test_masking_twice_is_refused():
    model = net()
    mask_(model, random_masks(model))
    with pytest.raises(ValueError, match=r"'conv.weight' is already parametrized"):
        mask_(model, {"conv.weight": torch.ones_like(model.conv.weight)})


def test_state_dict_holds_dense_weights_and_masks_and_loads_into_a_masked_model():
    model, x = net(), torch.randn(2, 3, 8, 8)
    keep = random_masks(model)
    mask_(model, keep)
    state = model.state_dict()
    assert "conv.parametrizations.weight.original" in state and "conv.parametrizations.weight.0.mask" in state
    assert "conv.weight" not in state
    other = net(seed=3)
    mask_(other, {n: torch.ones_like(k) for n, k in keep.items()})
    other.load_state_dict(state)
    assert torch.equal(other(x), model(x))
    assert all(torch.equal(masks_of(other)[n], k) for n, k in keep.items())


def test_save_and_prune_refuse_live_masks_and_touch_nothing(tmp_path):
    model, x = net(), torch.randn(1, 3, 8, 8)
    mask_(model, random_masks(model))
    snap = snapshot(model)
    target = tmp_path / "ckpt"
    with pytest.raises(torchslim.CheckpointError, match=r"'conv.weight'.*remove_masks_\(model\)"):
        torchslim.save(model, target)
    assert not target.exists()
    existing = tmp_path / "old"
    torchslim.save(net(), existing)
    files = {p.name: p.read_bytes() for p in existing.iterdir()}
    with pytest.raises(torchslim.CheckpointError, match="live parametrizations"):
        torchslim.save(model, existing)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == files
    with pytest.raises(PruningError, match=r"torchslim.prune_ refuses.*'conv2.weight'.*remove_masks_"):
        torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    assert_untouched(model, snap)
    assert set(masks_of(model)) == {"conv.weight", "conv2.weight", "fc.weight"}
    with pytest.raises(torchslim.CheckpointError, match=r"torchslim.load refuses"):
        torchslim.load(existing, model)
    assert_untouched(model, snap)


def test_baked_model_prunes_saves_and_loads(tmp_path):
    model, x = net(), torch.randn(1, 3, 8, 8)
    mask_(model, random_masks(model))
    remove_masks_(model)
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.25))
    torchslim.save(model, tmp_path / "ckpt")
    loaded = torchslim.load(tmp_path / "ckpt", net(seed=7))
    assert torch.equal(loaded(x), model(x))


def test_other_parametrizations_are_refused_too(tmp_path):
    model = net()
    parametrize.register_parametrization(model.fc, "weight", nn.Identity())
    with pytest.raises(torchslim.CheckpointError, match=r"'fc.weight'.*remove_parametrizations"):
        torchslim.save(model, tmp_path / "x")


def _agp_run(structured: bool, keep_dense: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 4)).train()
    x = torch.randn(1, 3, 8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = torchslim.AGPPruner(model, x, final_sparsity=0.5, total_steps=6, frequency=2, structured=structured,
                                 optimizer=optimizer, keep_dense=keep_dense)
    gen = torch.Generator().manual_seed(1)
    masks, dense_kept = [], []
    for _ in range(8):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        pruner.step()
        masks.append({n: m.clone() for n, m in pruner.masks.masks.items()})
        if keep_dense and "0.weight" in pruner.masks.masks:
            keep = pruner.masks.masks["0.weight"]
            assert torch.equal(model[0].weight[~keep], torch.zeros(int((~keep).sum())))  # the model reads zeros
            dense_kept.append(bool((model[0].parametrizations.weight.original[~keep] != 0).any()))
    pruner.finalize()
    return model.eval(), x, masks, dense_kept


@pytest.mark.parametrize("structured", [True, False])
def test_agp_with_kept_dense_weights_prunes_like_hard_zeroing(structured):
    """The model computes with the same masked weights either way, so training and the final
    model are identical; with keep_dense the masked dense values were kept until finalize."""
    hard, x, hard_masks, _ = _agp_run(structured, keep_dense=False)
    kept, _, kept_masks, dense_kept = _agp_run(structured, keep_dense=True)
    assert len(hard_masks) == len(kept_masks)
    for a, b in zip(hard_masks, kept_masks):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert dense_kept and all(dense_kept)
    assert not torchslim.sparsity.live_parametrizations(kept)
    assert {k: v.shape for k, v in kept.state_dict().items()} == {k: v.shape for k, v in hard.state_dict().items()}
    assert torch.equal(kept(x), hard(x))
