"""Grouped (with its channel shuffles kept), dilated and collapse rewrites, and a rewrite of the
MODNet-shaped net's HR branch that still prunes, verifies and round-trips."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchslim
from torchslim.models import create_model
from torchslim.rewrite import (GroupedConv2d, LowRankLinear, RewriteConfig, SeparableConv2d, collapse_, fit_dilated,
                               fit_grouped, rewrite_)
from torchslim.rewrite.grouped import assign_groups


pytestmark = pytest.mark.usefixtures("one_thread")


def block_diagonal_conv(cin: int = 12, cout: int = 8, groups: int = 4, k: int = 3, seed: int = 0) -> nn.Conv2d:
    """A dense conv that is block-diagonal after hidden permutations of its inputs and outputs."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)
    w = torch.zeros_like(conv.weight)
    ni, no = cin // groups, cout // groups
    for g in range(groups):
        w[g * no:(g + 1) * no, g * ni:(g + 1) * ni] = torch.randn(no, ni, k, k)
    with torch.no_grad():
        conv.weight.copy_(w[torch.randperm(cout)][:, torch.randperm(cin)])
    return conv


def effective_matrix(block: nn.Module, cin: int) -> torch.Tensor:
    """The (out, in) matrix a 1x1 block applies, probed with unit inputs (bias removed)."""
    eye = torch.eye(cin).reshape(cin, cin, 1, 1)
    zero = block(torch.zeros(1, cin, 1, 1))
    return (block(eye) - zero)[:, :, 0, 0].T.detach().double()


def test_grouped_is_exact_for_a_block_diagonal_original_after_the_permutation():
    conv = block_diagonal_conv()
    x = torch.randn(2, 12, 7, 7)
    fit = fit_grouped(conv, 4)
    assert isinstance(fit.block, GroupedConv2d) and fit.block[1].groups == 4 and fit.error < 1e-12
    torch.testing.assert_close(fit.block(x), conv(x), atol=1e-5, rtol=1e-5)
    one = fit_grouped(conv, 1)
    torch.testing.assert_close(one.block(x), conv(x), atol=1e-5, rtol=1e-5)


def test_grouped_error_is_the_dropped_off_block_energy_and_beats_no_permutation():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 1, bias=False)
    with torch.no_grad():  # mostly block-diagonal (hidden permutation) plus noise
        conv.weight.copy_(block_diagonal_conv(8, 8, 2, k=1, seed=3).weight + 0.05 * torch.randn(8, 8, 1, 1))
    fit = fit_grouped(conv, 2)
    w = conv.weight.detach().double()[:, :, 0, 0]
    kept = effective_matrix(fit.block, 8)
    assert float((kept - w).norm() / w.norm()) == pytest.approx(fit.error, rel=1e-5)
    contiguous = w.clone()
    contiguous[:4, 4:] = 0
    contiguous[4:, :4] = 0
    assert fit.error < float((contiguous - w).norm() / w.norm())
    in_label, out_label = assign_groups(conv, 2)
    assert sorted(map(int, torch.bincount(torch.as_tensor(in_label)))) == [4, 4]
    assert sorted(map(int, torch.bincount(torch.as_tensor(out_label)))) == [4, 4]


@pytest.mark.parametrize("k, dilation", [(5, 2), (7, 3)])
def test_dilated_reproduces_an_already_dilated_kernel_with_and_without_data(k, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, k, stride=2, padding=k // 2)
    mask = torch.zeros(k, k)
    mask[::dilation, ::dilation] = 1
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(2, 3, 13, 13)
    plain = fit_dilated(conv)
    assert plain.block.dilation == (dilation, dilation) and plain.block.kernel_size == (3, 3) and plain.error == 0
    torch.testing.assert_close(plain.block(x), conv(x), atol=1e-5, rtol=1e-5)
    model = nn.Sequential(copy.deepcopy(conv))
    rewrite_(model, x, RewriteConfig(to="dilated", data=[x]))
    torch.testing.assert_close(model(x), conv(x), atol=1e-5, rtol=1e-5)


def test_dilated_least_squares_error_is_the_output_error_and_beats_sampling_on_the_data():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 5, padding=2, bias=False)
    base = torch.randn(8, 3, 12, 12)
    x = base + torch.roll(base, 1, dims=3)  # correlated neighbouring pixels, as in images
    moment_model = nn.Sequential(copy.deepcopy(conv))
    rewrite_(moment_model, x, RewriteConfig(to="dilated", data=[x]))
    fitted = torchslim.pruning_history(moment_model)
    assert fitted
    out = conv(x).detach().double()
    err_ls = float((moment_model(x).detach().double() - out).norm() / out.norm())
    err_sampled = float((fit_dilated(conv).block(x).detach().double() - out).norm() / out.norm())
    plan, moments = torchslim.rewrite.plan_rewrite(nn.Sequential(conv), x, RewriteConfig(to="dilated", data=[x]))
    assert plan.layers[0].fit_error == pytest.approx(err_ls, rel=1e-3)
    assert err_ls < err_sampled


def test_collapse_fuses_a_factorised_block_back_exactly_where_it_saves_macs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    x = torch.randn(3, 6)
    reference = model(x)
    rewrite_(model, x, RewriteConfig(to="lowrank", modules=["0"], setting=6))  # full rank: dearer than dense
    rewrite_(model, x, RewriteConfig(to="lowrank", modules=["2"], setting=4))
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    fused = collapse_(model)
    assert fused == ["0", "2"]  # 6*(6+10)=96 > 60 and 4*(10+4)=56 > 40 MACs per row
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    torchslim.save(model, tmp_path / "ck")
    fresh = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    assert torch.equal(torchslim.load(tmp_path / "ck", fresh)(x), model(x))


def test_collapse_separable_is_exact_and_skips_blocks_that_save_macs():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(copy.deepcopy(conv))
    x = torch.randn(2, 4, 8, 8)
    rewrite_(model, x, RewriteConfig(to="separable", setting=1))
    assert collapse_(model) == []  # 4*(9+6)=60 < 216: the separable form is cheaper, kept
    assert collapse_(model, only_if_cheaper=False) == ["0"]
    torch.testing.assert_close(model(x), torchslim.rewrite.fit_separable(conv, 1).block(x), atol=1e-5, rtol=1e-5)


def test_modnet_hr_branch_rewrite_prunes_verifies_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = create_model("modnet").eval()
    img = torch.randn(1, 3, 64, 64)
    inputs = ((img,), {"inference": True})
    with torch.no_grad():
        before = model(img, inference=True)[2]
    exact = copy.deepcopy(model)  # at multiplier k*k = 9 the separable form is exact
    rewrite_(exact, inputs, RewriteConfig(to="separable", modules=["hr_branch.*.layers.0"], setting=9))
    with torch.no_grad():
        torch.testing.assert_close(exact(img, inference=True)[2], before, atol=1e-4, rtol=1e-4)
    result = rewrite_(model, inputs, RewriteConfig(to="separable", modules=["hr_branch.*.layers.0"], target_macs=0.9))
    assert result.plan.layers and all(p.name.startswith("hr_branch.") for p in result.plan.layers)
    assert all(isinstance(model.get_submodule(p.name), SeparableConv2d) for p in result.plan.layers)
    assert result.macs_after < result.macs_before
    assert 0 < max(result.errors.values()) < 1
    rewritten = copy.deepcopy(model)
    pruned = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.25, op_names=["hr_branch.*"]))
    assert pruned.macs_after < pruned.macs_before
    assert torchslim.verify(rewritten, model, inputs, pruned.plan).ok
    torchslim.save(model, tmp_path / "ck")
    loaded = torchslim.load(tmp_path / "ck", create_model("modnet").eval())
    assert torch.equal(loaded(img, inference=True)[2], model(img, inference=True)[2])


def test_grouped_rewrite_round_trips_exports_and_prunes_through_its_shuffles(tmp_path):
    from test_rewrite import net, batch

    model, x = net(), batch()  # fold=False: every side keeps its shuffle (test_rewrite_fold.py folds them)
    rewrite_(model, x, RewriteConfig(to="grouped", modules=["b1", "b2", "down"], setting=4, fold=False))
    assert isinstance(model.b1, GroupedConv2d) and model.b1[1].groups == 4
    torchslim.save(model, tmp_path / "ck")
    assert torch.equal(torchslim.load(tmp_path / "ck", net(seed=4))(x), model(x))
    assert torchslim.export_onnx(model, x, tmp_path / "m.onnx").max_abs_error < 1e-4
    rewritten = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.4))
    assert torchslim.verify(rewritten, model, x, result.plan).ok
    # the output shuffle of "down" lost the entries of the removed channels and was renumbered
    assert model.down[1].out_channels < rewritten.down[1].out_channels
    assert result.plan.steps[-1].renumbered == ["down.2.order"]
    order = model.down[2].order
    assert sorted(order.tolist()) == list(range(model.down[1].out_channels))
    kept = [j for j in range(24) if j not in result.plan.removed["down.2.order"][0]]
    old = rewritten.down[2].order[kept]
    assert order.tolist() == torch.argsort(torch.argsort(old)).tolist()  # ranks among the kept
    torchslim.save(model, tmp_path / "pruned")
    assert torch.equal(torchslim.load(tmp_path / "pruned", net(seed=4))(x), model(x))
