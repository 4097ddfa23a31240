"""The grouped rewrite folds its channel permutations into the neighbouring layers: a side whose
channels are one free dependency group is reordered there (no ChannelShuffle, no index_select),
a side that is not (the model's input or output, a residual around the conv, a group another
fold already reordered) keeps its shuffle with the reason in the plan; the folded model computes
the fit exactly, prunes, saves/loads bit for bit and exports to ONNX."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import torchslim
from archs import ARCHS
from test_rewrite import batch, net
from test_rewrite_structures import block_diagonal_conv
from torchslim.graph import DependencyGraph
from torchslim.rewrite import ChannelShuffle, GroupedConv2d, RewriteConfig, fold_shuffles_, fit_grouped, rewrite_
from torchslim.rewrite import fold

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn(first: bool = False) -> nn.Sequential:
    """conv-bn-relu -> a conv block-diagonal up to hidden permutations (12 -> 8, 4 blocks) ->
    bn-relu -> conv; ``first``: the hidden-permutation conv is the first layer."""
    torch.manual_seed(0)
    target = block_diagonal_conv(12, 8, 4, seed=2)
    head: list[nn.Module] = [] if first else [nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU()]
    model = nn.Sequential(*head, target, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
    return model.eval()


def image(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(7))


def shuffles(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules() if isinstance(m, ChannelShuffle)]


def traced_ops(model: nn.Module, inputs) -> set[str]:
    return {str(op.func) for op in DependencyGraph.build(model, inputs).trace.ops}


def test_both_sides_fold_and_the_outputs_are_the_original_with_no_index_select():
    model, x = small_cnn(), image()
    expected = model(x)
    result = rewrite_(model, x, RewriteConfig(to="grouped", modules=["3"], setting=4))
    assert isinstance(model[3], GroupedConv2d) and model[3].conv.groups == 4 and result.errors["3"] < 1e-12
    assert shuffles(model[3]) == [] and model[3].in_order is None and model[3].out_order is None
    assert {side: f.folded for side, f in result.plan.layers[0].folds.items()} == {"input": True, "output": True}
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert not any("index_select" in op for op in traced_ops(model, x))
    assert "3 input: folded" in result.plan.table()
    kept = small_cnn()
    rewrite_(kept, x, RewriteConfig(to="grouped", modules=["3"], setting=4, fold=False))
    assert shuffles(kept[3]) == ["0", "2"] and any("index_select" in op for op in traced_ops(kept, x))


def test_the_network_input_side_keeps_its_shuffle_and_the_output_folds():
    model, x = small_cnn(first=True), image(12)
    expected = model(x)
    result = rewrite_(model, x, RewriteConfig(to="grouped", modules=["0"], setting=4))
    folds = result.plan.layers[0].folds
    assert not folds["input"].folded and "model's input" in folds["input"].reason
    assert folds["output"].folded
    assert shuffles(model[0]) == ["0"]
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_the_network_output_side_keeps_its_shuffle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU(), block_diagonal_conv(12, 8, 4, seed=2)).eval()
    x = image()
    expected = model(x)
    result = rewrite_(model, x, RewriteConfig(to="grouped", modules=["2"], setting=4))
    folds = result.plan.layers[0].folds
    assert folds["input"].folded and not folds["output"].folded and "model's output" in folds["output"].reason
    assert shuffles(model[2]) == ["2"]
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class AroundResidual(nn.Module):
    """``y = x + conv(x)``: the conv's input and output channels are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.conv(x))


def test_a_conv_inside_a_residual_keeps_both_shuffles_and_says_why():
    torch.manual_seed(0)
    model, x = AroundResidual().eval(), image()
    fitted = fit_grouped(model.conv, 2).block
    result = rewrite_(model, x, RewriteConfig(to="grouped", modules=["conv"], setting=2))
    for side in ("input", "output"):
        assert not result.plan.layers[0].folds[side].folded
        assert "one dependency group" in result.plan.layers[0].folds[side].reason
    assert shuffles(model.conv) == shuffles(fitted)
    assert model.conv.in_order == fitted.in_order and model.conv.out_order == fitted.out_order


@pytest.mark.parametrize("build, cfg", [
    (lambda: (net(), batch()), {"modules": ["b1", "b2", "down"], "setting": 4}),
    (lambda: (net(), batch()), {"target_macs": 0.5}),
    (lambda: ARCHS["residual_add"](), {"modules": ["block1.1", "block2.1", "block1.0.0"], "setting": 4}),
])
def test_several_folds_through_residual_adds_compute_the_unfolded_rewrite(build, cfg):
    model, x = build()
    unfolded = copy.deepcopy(model)
    expected = rewrite_(unfolded, x, RewriteConfig(to="grouped", fold=False, **cfg))
    result = rewrite_(model, x, RewriteConfig(to="grouped", **cfg))
    assert [p.name for p in result.plan.layers] == [p.name for p in expected.plan.layers]
    assert len(result.plan.layers) >= 2
    folds = [f for p in result.plan.layers for f in p.folds.values()]
    assert any(f.folded for f in folds) and any(not f.folded for f in folds)  # a group is reordered once only
    assert all("already reordered" in f.reason or "model's" in f.reason for f in folds if not f.folded)
    n_shuffles = sum(len(shuffles(model.get_submodule(p.name))) for p in result.plan.layers)
    assert n_shuffles == sum(not f.folded for f in folds) < 2 * len(result.plan.layers)
    torch.testing.assert_close(model(x), unfolded(x), atol=1e-5, rtol=1e-5)


def test_prune_after_folding_is_verified_and_renumbers_no_shuffle():
    x = image()
    graphs, renumbered = {}, {}
    for fold_ in (True, False):
        model = small_cnn()
        rewrite_(model, x, RewriteConfig(to="grouped", modules=["3"], setting=4, fold=fold_))
        graph = DependencyGraph.build(model, x)
        graphs[fold_] = sum(len(g) * graph.atom_width(g) for g in graph.groups)
        rewritten = copy.deepcopy(model)
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, verify=True))
        assert result.macs_after < result.macs_before and result.max_abs_error is not None
        assert torchslim.verify(rewritten, model, x, result.plan).ok
        assert model[3].conv.in_channels < 12 and model[3].conv.out_channels < 8
        renumbered[fold_] = result.plan.steps[-1].renumbered
    # the engine renumbers a kept shuffle's index buffer, so a shuffle never pinned channels:
    # folding keeps every prunable channel and leaves no index buffer to renumber
    assert graphs[True] >= graphs[False] > 0
    assert renumbered[True] == [] and sorted(renumbered[False]) == ["3.0.order", "3.2.order"]


def test_save_load_of_a_folded_model_is_bit_exact_with_its_neighbours_permuted(tmp_path):
    model, x = net(), batch()
    original = net()
    rewrite_(model, x, RewriteConfig(to="grouped", modules=["b1", "b2", "down"], setting=4))
    assert not torch.equal(model.stem.weight, original.stem.weight)  # b1's input group was reordered
    torchslim.save(model, tmp_path / "ck")
    loaded = torchslim.load(tmp_path / "ck", net(seed=4))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert loaded.b1.in_order is None and loaded.down.in_order == model.down.in_order
    assert torch.equal(loaded(x), model(x))
    pruned = copy.deepcopy(model)
    torchslim.prune_(pruned, x, torchslim.PruneConfig(ratio=0.4))
    torchslim.save(pruned, tmp_path / "pruned")
    assert torch.equal(torchslim.load(tmp_path / "pruned", net(seed=4))(x), pruned(x))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_a_folded_model_exports_to_onnx(tmp_path):
    model, x = net(), batch()
    rewrite_(model, x, RewriteConfig(to="grouped", modules=["b1", "b2", "down"], setting=4))
    report = torchslim.export_onnx(model, x, tmp_path / "m.onnx")
    assert report.max_abs_error is not None and report.max_abs_error < 1e-4


def test_a_fold_that_changes_the_outputs_is_undone_and_every_shuffle_kept(monkeypatch):
    model, x = small_cnn(), image()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fitted = fit_grouped(model[3], 4).block
    permute = fold.permute_

    def broken(graph, orders, tx):  # a permutation that also changes a value (of a tensor it moved)
        indices = permute(graph, orders, tx)
        with torch.no_grad():
            model[0].bias.mul_(2)
        return indices

    monkeypatch.setattr(fold, "permute_", broken)
    folding = fold_shuffles_(model, x, {"3": fitted})
    assert all(not f.folded and "changed the outputs" in f.reason for f in folding.sides["3"].values())
    assert len(shuffles(fitted)) == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the permutations were undone


def test_grouped_conv_takes_absent_or_identity_orders_and_refuses_a_non_permutation():
    block = GroupedConv2d(4, 6, 3, 2, None, list(range(6)))
    assert shuffles(block) == [] and isinstance(block[0], nn.Identity) and isinstance(block[2], nn.Identity)
    assert GroupedConv2d(4, 6, 3, 2, [1, 0, 2, 3], None).in_order == [1, 0, 2, 3]
    with pytest.raises(ValueError, match=r"in_order must be a permutation of range\(4\)"):
        GroupedConv2d(4, 6, 3, 2, [0, 0, 1, 2], None)
