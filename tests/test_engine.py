"""Engine tests: the pruned model equals the original with the removed channels zeroed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.graph import DependencyGraph

torch.manual_seed(0)


def randomize_norms_(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine params, so zeroing mistakes show up in outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model.eval()


class IBNorm(nn.Module):
    """MODNet's IBNorm: BatchNorm on the first half of the channels, InstanceNorm on the rest."""

    def __init__(self, channels: int):
        super().__init__()
        self.bnorm_channels = channels // 2
        self.bnorm = nn.BatchNorm2d(self.bnorm_channels)
        self.inorm = nn.InstanceNorm2d(channels - self.bnorm_channels, affine=False)

    def forward(self, x):
        bn = self.bnorm(x[:, : self.bnorm_channels].contiguous())
        inn = self.inorm(x[:, self.bnorm_channels :].contiguous())
        return torch.cat((bn, inn), 1)


class MiniMODNet(nn.Module):
    """Concat with the raw image, IBNorm, interpolation, SE gating, a residual."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), IBNorm(16), nn.ReLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid())
        self.hr = nn.Sequential(nn.Conv2d(16 + 3, 16, 3, 1, 1), IBNorm(16), nn.ReLU())
        self.fuse = nn.Conv2d(16 + 3, 1, 1)

    def forward(self, img, inference: bool = True):
        e = self.enc(img)
        e = e * self.se(e).view(e.shape[0], -1, 1, 1)
        img2x = F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False)
        h = self.hr(torch.cat((img2x, e), 1)) + e
        up = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        matte = torch.sigmoid(self.fuse(torch.cat((up, img), 1)))
        return (None, None, matte) if inference else (e, h, matte)


class Attention(nn.Module):
    """HF-style attention with q/k/v/o projections and grouped-query heads."""

    def __init__(self, dim=32, heads=4, kv_heads=4):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        att = (q @ k.transpose(-1, -2) / self.head_dim**0.5).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        x = x + self.o(y)
        return x + self.mlp(self.norm(x))


def _tv(name, size=64):
    torchvision = pytest.importorskip("torchvision")
    return lambda: (randomize_norms_(getattr(torchvision.models, name)()), torch.randn(1, 3, size, size))


ARCHS = {
    "resnet18": _tv("resnet18"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "shufflenet_v2": _tv("shufflenet_v2_x0_5"),
    "densenet121": _tv("densenet121"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "mini_modnet": lambda: (randomize_norms_(MiniMODNet()), ((torch.randn(1, 3, 32, 32),), {"inference": False})),
    "attention": lambda: (Attention().eval(), torch.randn(1, 6, 32)),
    "attention_gqa": lambda: (Attention(32, 8, 2).eval(), torch.randn(1, 6, 32)),
    "mha": lambda: (nn.Sequential(nn.Linear(8, 32), nn.MultiheadAttention(32, 4, batch_first=True)).eval(), None),
    "grouped_conv": lambda: (randomize_norms_(nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, groups=4), nn.ReLU(),
        nn.Conv2d(32, 32, 3, groups=32), nn.ConvTranspose2d(32, 8, 2, 2), nn.GroupNorm(4, 8), nn.Conv2d(8, 4, 1))),
        torch.randn(1, 3, 16, 16)),
    "conv1d_3d": lambda: (nn.Sequential(nn.Conv1d(3, 12, 3), nn.BatchNorm1d(12), nn.ReLU(), nn.Conv1d(12, 5, 3)).eval(),
                          torch.randn(2, 3, 20)),
    "pixel_shuffle": lambda: (nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.PixelShuffle(2),
                                            nn.Conv2d(8, 3, 3, padding=1)).eval(), torch.randn(1, 3, 8, 8)),
}


def _build(name):
    model, inputs = ARCHS[name]()
    if inputs is None:  # MHA inside Sequential needs (q, k, v)
        lin, mha = model[0], model[1]

        class Wrap(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin, self.mha = lin, mha
                self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))

            def forward(self, x):
                h = self.lin(x)
                return self.head(self.mha(h, h, h, need_weights=False)[0])

        model, inputs = Wrap().eval(), torch.randn(1, 5, 8)
    return model, inputs


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_prune_is_exact(name, criterion):
    model, inputs = _build(name)
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, criterion=criterion, exact_only=True))
    assert result.plan, f"{name}: nothing was pruned"
    assert result.params_after < result.params_before
    report = torchslim.verify(original, model, inputs, result.plan)
    assert report.ok, report.message
    # the plan's removed indices really are gone from the parameters
    for pname, dims in result.plan.removed.items():
        before = dict(original.named_parameters()).get(pname)
        after = dict(model.named_parameters()).get(pname)
        if before is not None:
            for dim, idx in dims.items():
                assert after.shape[dim] == before.shape[dim] - len(idx)


def test_inexact_groups_are_flagged():
    model = nn.Sequential(nn.Linear(8, 32), Attention(), nn.Linear(32, 3)).eval()
    graph = DependencyGraph.build(model, torch.randn(1, 6, 8))
    residual = [g for g in graph.groups if any(p == "1.norm.weight" for p, _ in g.params)]
    assert residual and not residual[0].exact  # LayerNorm statistics run over the residual width
    assert any(g.exact for g in graph.groups)


@pytest.mark.parametrize("batch", [1, 3])
def test_gqa_heads_prune_with_their_kv_head(batch):
    """repeat_kv (expand kv heads to (kv, n_rep), merge to heads) then q @ k^T as a batched
    matmul: the merged heads must be coupled by their kv head, not by the n_rep copies (a
    broadcast, which pinned every q/k/v row), so a kv head and its 4 query heads are one atom."""
    model, x = Attention(32, 8, 2).eval(), torch.randn(batch, 6, 32)
    graph = DependencyGraph.build(model, x)
    k, v = graph.param_labels("k.weight", 0), graph.param_labels("v.weight", 0)  # 2 kv heads x 4 dims
    q = graph.param_labels("q.weight", 0)  # 8 heads x 4 dims
    for kv_head in range(2):
        atom = k[4 * kv_head]
        assert set(k[4 * kv_head:4 * kv_head + 4]) == set(v[4 * kv_head:4 * kv_head + 4]) == {atom}
        assert set(q[16 * kv_head:16 * kv_head + 16]) == {atom}  # its query heads 4h..4h+3
        assert not graph.atom_pinned[atom] and not graph.atom_inexact[atom]
    assert k[0] != k[4]
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exact_only=True, op_names=["k"]))
    assert (model.q.out_features, model.k.out_features, model.v.out_features, model.o.in_features) == (16, 4, 4, 16)
    assert (model.heads, model.kv_heads) == (4, 1)
    assert model.mlp[0].out_features == 64  # only the heads were asked for
    report = torchslim.verify(original, model, x, result.plan)
    assert report.ok and report.max_abs_error < 1e-5, report.message


def test_all_or_nothing_on_failure():
    class Literal(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 1)
            self.b = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = self.a(x)
            y = y.reshape(1, 16, -1).reshape(1, 16, 4, 4)  # literal 16 held by no attribute
            return self.b(y)

    model = Literal().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 4, 4)
    expected = model(x)
    # the only prunable group breaks the literal reshape: its removal fails, is rolled back and
    # is said out loud; the model comes back bit for bit, with its attributes
    with pytest.warns(UserWarning, match=r"rolled back.*aten\.view\.default in module '<root>'"):
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    assert not result.plan and result.groups_pruned == 0
    assert result.skipped and all("aten.view.default" in reason for reason in result.skipped)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert (model.a.out_channels, model.b.in_channels) == (16, 16)
    assert torch.equal(model(x), expected)


def test_ibnorm_split_point_follows():
    model = randomize_norms_(MiniMODNet())
    inputs = ((torch.randn(1, 3, 32, 32),), {"inference": False})
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.5, criterion="random", seed=3))
    ib = model.enc[1]
    assert ib.bnorm_channels == ib.bnorm.num_features == ib.bnorm.weight.shape[0]
    assert torchslim.verify(original, model, inputs, result.plan).ok


def test_exclude_and_op_names():
    model, x = _build("resnet18")
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exclude=["layer1.*", "conv1", "bn1"]))
    assert model.layer1[0].conv1.out_channels == 64
    assert model.layer2[0].conv1.out_channels < 128 and result.plan
    model, x = _build("resnet18")
    torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, op_names=["layer3.*.conv1"]))
    assert model.layer3[0].conv1.out_channels == 128 and model.layer2[0].conv1.out_channels == 128
    with pytest.raises(ValueError, match="op_names"):
        torchslim.prune_(model, x, torchslim.PruneConfig(op_names=["nothing.here"]))


@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_channels_prune_at_any_batch(affine):
    """InstanceNorm runs as a BatchNorm over (1, batch * C): at batch 4 the merge's outer digit is
    the input's batch, which stays, so the channels must be coupled by the C digit (they were
    pinned). The same channels are prunable at batch 1 and 4, and the result is exact."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=affine), nn.ReLU(),
                             nn.Conv2d(16, 8, 3, padding=1)).eval()

    widths = {}
    for batch in (1, 4):
        model, x = build(), torch.randn(batch, 3, 12, 12)
        original = copy.deepcopy(model)
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
        assert torchslim.verify(original, model, x, result.plan).ok
        widths[batch] = model[0].out_channels
    assert widths == {1: 8, 4: 8}


class SharedBackbone(nn.Module):
    """A backbone registered under two names, as MODNet's ``lr_branch.backbone`` is ``backbone``."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.branch = nn.Module()
        self.branch.backbone = self.backbone
        self.head = nn.Sequential(nn.Conv2d(32, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 2, 1))

    def forward(self, x):
        return self.head(self.branch.backbone(x))


@pytest.mark.parametrize("alias", ["backbone.*", "branch.backbone.*"])
def test_shared_module_patterns_match_by_either_name(alias):
    model, x = randomize_norms_(SharedBackbone()), torch.randn(1, 3, 16, 16)
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exclude=[alias]))
    assert [m.out_channels for m in model.backbone if isinstance(m, nn.Conv2d)] == [16, 32]
    assert model.head[0].out_channels == 12
    assert torchslim.verify(original, model, x, result.plan).ok
    model = copy.deepcopy(original)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, op_names=[alias]))
    assert [m.out_channels for m in model.backbone if isinstance(m, nn.Conv2d)] == [8, 16]
    assert model.head[0].out_channels == 24
    assert torchslim.verify(original, model, x, result.plan).ok


class TwinConvs(nn.Module):
    """Two convs on one input, concatenated: no op ties their widths; a module rule does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_module_rule_applies_under_the_canonical_name_of_a_shared_module():
    from torchslim.graph.dependency import _MODULE_RULES

    @torchslim.register_module_rule(TwinConvs)
    def _tie(c, module, name, trace):
        c.same(trace.param_nodes[f"{name}.a.weight"], 0, trace.param_nodes[f"{name}.b.weight"], 0)

    try:
        twins = TwinConvs()
        model = nn.Sequential(nn.Conv2d(3, 8, 1), twins, nn.ReLU(), nn.Conv2d(32, 4, 1))
        model[3].alias = twins  # the same module under a second, later name ("3.alias")
        x = torch.randn(1, 3, 8, 8)
        original = copy.deepcopy(model)
        graph = DependencyGraph.build(model, x)
        assert any({"1.a.weight", "1.b.weight"} <= {n for n, _ in g.params} for g in graph.groups)
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, op_names=["3.alias.a"]))
        assert twins.a.out_channels == twins.b.out_channels == 8
        assert torchslim.verify(original, model, x, result.plan).ok
    finally:
        _MODULE_RULES.pop(TwinConvs, None)


@pytest.mark.parametrize("field,value", [("ratio", 1.0), ("ratio", -0.1), ("round_to", 0), ("criterion", "bogus")])
def test_invalid_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        torchslim.PruneConfig(**{field: value})


def test_target_macs_and_round_to():
    model, x = _build("resnet18")
    result = torchslim.prune_(model, x, torchslim.PruneConfig(target_macs=0.5, round_to=8, exact_only=True))
    assert result.macs_after <= 0.5 * result.macs_before
    assert result.macs_after > 0.3 * result.macs_before  # searched, not overshot wildly
    assert all(m.out_channels % 8 == 0 for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels > 3)


def test_prune_twice_composes_plans():
    model, x = _build("mobilenet_v2")
    original = copy.deepcopy(model)
    first = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.3))
    second = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.3, criterion="random"))
    plan = first.plan.extend(second.plan)
    assert torchslim.verify(original, model, x, plan).ok


def test_unknown_op_blocks_with_a_named_error():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            y = torch.fft.fft(y, dim=1).real  # mixes channels; no rule
            return self.b(y)

    model = Weird().eval()
    with pytest.raises(torchslim.PruningError, match=r"aten\._fft.*module '<root>'.*register a rule"):
        torchslim.prune_(model, torch.randn(1, 3, 4, 4), torchslim.PruneConfig(op_names=["a"]))
    assert model.a.out_channels == 8


def test_modnet_to_half_macs_in_one_call():
    """The brief's user story: one call, exact, <= 50% MACs, IBNorm split points follow."""
    from torchslim.models import create_model

    torch.manual_seed(0)
    model = randomize_norms_(create_model("modnet"))
    inputs = ((torch.randn(1, 3, 128, 128),), {"inference": False})
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(target_macs=0.5, exact_only=True))
    assert result.macs_after <= 0.5 * result.macs_before
    assert torchslim.verify(original, model, inputs, result.plan).ok
    for module in model.modules():
        if hasattr(module, "bnorm_channels"):
            assert module.bnorm_channels == module.bnorm.num_features


def test_groups_without_weights_are_not_candidates():
    """An index buffer's token positions (relative-position bias of Swin/MaxViT) hold no weight:
    no group may consist of buffers only, so pruning never tries to remove tokens."""
    from tests.archs import RelPosWindowAttention, img

    model = RelPosWindowAttention().eval()
    graph = torchslim.DependencyGraph.build(model, img(3, 4))
    weights = {n for n, _ in model.named_parameters()}
    assert graph.groups and all(any(name in weights for name, _ in g.params) for g in graph.groups)


def test_near_tie_in_a_selection_is_not_a_pruning_error():
    """Outputs after a top-k/NMS may differ when its (matching) scores nearly tie; a mismatch
    before the first diverging selection is still an error."""
    from torchslim.pruning._near_ties import Selection, near_tie_explains

    scores = torch.tensor([0.5, 0.5000001, 0.1])
    picked, other = torch.tensor([1]), torch.tensor([0])
    same = Selection("aten.topk.default", [scores], [scores[1:2], picked])
    tie = Selection("aten.topk.default", [scores + 1e-8], [scores[0:1], other])
    assert near_tie_explains([same, same], [same, tie], atol=1e-5, rtol=1e-4) is not None
    off = Selection("aten.topk.default", [scores + 0.1], [scores[0:1], other])
    assert near_tie_explains([same], [off], atol=1e-5, rtol=1e-4) is None
    earlier = Selection("aten.gt.Scalar", [scores + 0.1], [scores > 0.3])
    first = Selection("aten.gt.Scalar", [scores], [scores > 0.3])
    assert near_tie_explains([first, same], [earlier, tie], atol=1e-5, rtol=1e-4) is None
    assert near_tie_explains([same], [same], atol=1e-5, rtol=1e-4) is None  # nothing diverged: nothing explained


def test_selection_recorder_sees_topk_and_thresholds():
    from torchslim.pruning.verify import run_recorded

    class Picker(nn.Module):
        def forward(self, x):
            s = x.sum(1)
            return s.topk(2).indices, (s > 0).nonzero()

    run = run_recorded(Picker(), torch.randn(2, 5))
    assert [s.name.split(".")[1] for s in run.selections] == ["topk", "gt", "nonzero"]


@pytest.mark.parametrize("act", [nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Mish, nn.ELU, nn.ReLU6])
def test_inplace_activations_couple_like_their_functional_op(act):
    """``hardswish_`` has no pointwise tag and no rule of its own: it must not pin the channels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act(inplace=True), nn.Conv2d(8, 4, 1)).eval()
    original = copy.deepcopy(model)
    x = torch.randn(1, 3, 8, 8)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    assert model[0].out_channels == 4 and torchslim.verify(original, model, x, result.plan).ok


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: the weight is standardised per output channel with F.batch_norm."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_batch_statistics_mark_their_reduced_dims_inexact():
    """Removing a weight-standardised conv's input channels changes its weight statistics:
    such groups are inexact (skipped with exact_only), and the rest prunes exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), StdConv(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    graph = DependencyGraph.build(model, x)
    first = next(g for g in graph.groups if ("0.weight", 0) in g.params)
    second = next(g for g in graph.groups if ("2.weight", 0) in g.params)
    assert not first.exact and second.exact
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, exact_only=True))
    assert model[0].out_channels == 8 and model[2].out_channels == 4
    assert torchslim.verify(original, model, x, result.plan).ok


def test_graph_macs_direct_formulas_equal_torch_formulas(monkeypatch):
    """convolution / mm / addmm / bmm are counted from shapes directly (fast); the numbers must be
    torch's formulas / 2, before and after a removal, for grouped, transposed and 1d convs."""
    import numpy as np
    import torchvision

    from torchslim.graph import macs as graph_macs

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(8, 16, 3, stride=2, groups=2)
            self.conv = nn.Conv1d(16, 8, 3, groups=4)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(self.up(x).flatten(2))
            return self.fc(y.transpose(1, 2)) @ torch.ones(4, 3) + torch.bmm(y, y.transpose(1, 2)).sum()

    for model, x in ((Mixed(), torch.randn(2, 8, 5, 5)), (torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))):
        graph = DependencyGraph.build(model.eval(), x)
        removed = np.concatenate([g.atoms[: len(g) // 3] for g in graph.groups])
        direct = [graph_macs.estimate_macs(graph), graph_macs.estimate_macs(graph, removed)]
        monkeypatch.setattr(graph_macs, "DIRECT", {})
        graph._macs_memo.clear()
        assert [graph_macs.estimate_macs(graph), graph_macs.estimate_macs(graph, removed)] == direct
        assert direct[1] < direct[0]  # the removal changed the counted ops (the grouped transposed conv too)
        monkeypatch.undo()


def _prune_exactly(model: nn.Module, x, **config) -> "torchslim.PruneResult":
    """Prune ``model`` in place, check it equals its zeroed original and that no removal was
    rolled back (a rollback means some channels silently stayed)."""
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, x, torchslim.PruneConfig(**config))
    assert not result.skipped, result.skipped
    report = torchslim.verify(original, model, x, result.plan)
    assert report.ok, report.message
    return result


@pytest.mark.parametrize("inputs", [(2, 3, 16, 16), (4, 3, 20)])
def test_prelu_channels_prune_with_their_slopes(inputs):
    """torch views PReLU's (C,) weight as (1, C, 1, ...) before ``_prelu_kernel``: the slopes
    must follow the channels (they were left out, so every removal was rolled back)."""
    torch.manual_seed(0)
    conv = nn.Conv2d if len(inputs) == 4 else nn.Conv1d
    model = nn.Sequential(conv(3, 32, 3, padding=1), nn.PReLU(32), conv(32, 4, 1)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(-1, 1)  # distinct slopes: a wrong one shows in the output
    _prune_exactly(model, torch.randn(*inputs), ratio=0.5)
    assert model[0].out_channels == model[2].in_channels == 16
    assert model[1].num_parameters == model[1].weight.numel() == 16


def test_prelu_on_linear_features_and_a_shared_slope():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.PReLU(24), nn.Linear(24, 12), nn.PReLU(), nn.Linear(12, 3)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(-1, 1)
        model[3].weight.fill_(0.3)
    _prune_exactly(model, torch.randn(5, 6), ratio=0.5)
    assert (model[0].out_features, model[1].num_parameters, model[2].out_features) == (12, 12, 6)
    assert model[3].num_parameters == model[3].weight.numel() == 1


@pytest.mark.parametrize("cin, cout, groups", [(32, 32, 4), (16, 24, 4), (8, 16, 8), (8, 8, 8)])
def test_grouped_transposed_conv_prunes_every_group_alike(cin, cout, groups):
    """A grouped ConvTranspose2d's weight is (in, out / groups, k, k): input channels have their
    own rows, output channel g * out_g + j uses column j of group g's rows. Inputs are removed at
    the same local index in every group, outputs by their column j in every group; with one
    input channel per group, groups follow the inputs (as depthwise convs do)."""
    torch.manual_seed(0)
    model = randomize_norms_(nn.Sequential(
        nn.Conv2d(3, cin, 3, padding=1), nn.BatchNorm2d(cin), nn.ReLU(),
        nn.ConvTranspose2d(cin, cout, 2, stride=2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, 4, 1)))
    up = model[3]
    _prune_exactly(model, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert up.in_channels < cin and up.out_channels < cout
    assert up.in_channels % up.groups == 0 and up.out_channels % up.groups == 0
    assert up.weight.shape[:2] == (up.in_channels, up.out_channels // up.groups)
    assert model[6].in_channels == up.out_channels


@pytest.mark.parametrize("table", ["custom", "torch"])
def test_graph_macs_refuses_to_count_a_failing_formula_as_zero(monkeypatch, table):
    """An op whose MAC formula raises was counted as 0 MACs, so a MACs target could be "met"
    by ops never counted: the count must stop with the op and module named."""
    from torchslim.graph import macs as graph_macs

    def broken(*args, **kwargs):
        raise ValueError("unreadable call")

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.up = nn.Upsample(scale_factor=2, mode="bilinear")
            self.mix = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return torch.bmm(self.mix(self.up(self.conv(x))).flatten(2), torch.ones(1, 64, 2))

    graph = DependencyGraph.build(Up().eval(), torch.randn(1, 3, 4, 4))
    if table == "custom":
        monkeypatch.setitem(graph_macs.CUSTOM_MAPPING, torch.ops.aten.upsample_bilinear2d, broken)
        expected = r"upsample_bilinear2d.* in module 'up'.*ValueError: unreadable call"
    else:
        monkeypatch.setattr(graph_macs, "DIRECT", {})
        monkeypatch.setattr(graph_macs, "_formula", lambda op: broken if op.func.overloadpacket is torch.ops.aten.bmm else None)
        expected = r"aten\.bmm.* in module '<root>'"
    with pytest.raises(graph_macs.MacsError, match=expected):
        graph_macs.estimate_macs(graph)
