"""The bundled MODNet-shaped network: structure, and the brief's figures at 1x3x512x512.

The brief (seeds/000) gives 6.45 M params and 18117 M MACs. Finding, checked below with
hand formulas: those are exactly the Conv2d + Linear layers of the training-mode graph
(``inference=False``, so ``conv_lr`` and ``conv_hr`` run) -- 6,452,243 params and
18,117.07 M MACs. torchslim's total also counts the bilinear resizes (4 MACs per output
element) and the SE block's pooling, 18,213.27 M: 0.53% above the brief. BatchNorm adds
34,832 params (total 6,487,075, +0.6%). With ``inference=True`` the weight layers come to
15,466 M, 14.6% below: the post counted the training-mode graph.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchslim
from torchslim.cli import main
from torchslim.models import create_model, list_models
from torchslim.models.modnet import MODNet, IBNorm

BRIEF_PARAMS = 6.45e6
BRIEF_MACS = 18117e6


def _weight_layers(model: nn.Module, img: torch.Tensor, inference: bool) -> tuple[int, int]:
    """Conv2d + Linear params and MACs by hand (output elements x Cin/groups x kernel area), on meta tensors."""
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        meta = MODNet(hr_channels=model.hr_channels).eval()
    macs = []
    handles = [m.register_forward_hook(
        lambda m, i, o: macs.append(o.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
                                    if isinstance(m, nn.Conv2d) else o.numel() * m.in_features))
        for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        meta(img.to("meta"), inference)
    for h in handles:
        h.remove()
    params = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                 for p in m.parameters(recurse=False))
    return params, sum(macs)


def _bilinear_elements(h: int, w: int, hr: int = 32) -> int:
    """Output elements of MODNet's bilinear resizes in training mode, from the architecture."""
    s = lambda k: (h // k) * (w // k)  # noqa: E731 - pixels at 1/k scale
    lr = 1280 * s(16) + 96 * s(8)                                        # enc32x -> 1/16, lr16x -> 1/8
    hr_branch = 3 * s(2) + 3 * s(4) + 32 * s(4) + hr * s(2) + hr * s(1)  # img 1/2, img 1/4, lr8x, hr4x, hr2x
    fusion = 32 * s(4) + hr * s(2) + hr * s(1)                           # lr8x, lr4x, f2x
    return lr + hr_branch + fusion


def test_registered_and_structure():
    assert "modnet" in list_models()
    model = create_model("modnet").eval()
    assert isinstance(model, MODNet)
    assert model.lr_branch.backbone is model.backbone  # one module, two names, as in the original
    assert model.backbone.enc_channels == [16, 24, 32, 96, 1280]
    assert len(model.backbone.model.features) == 19
    ib = IBNorm(33)
    assert ib.bnorm_channels == 16 and ib.inorm_channels == 17 and isinstance(ib.bnorm_channels, int)
    assert ib.bnorm.num_features == 16 and not ib.inorm.affine
    se = model.lr_branch.se_block
    assert [(fc.in_features, fc.out_features, fc.bias) for fc in se.fc if isinstance(fc, nn.Linear)] == \
        [(1280, 320, None), (320, 1280, None)]
    assert model.lr_branch.conv_lr16x.layers[0].kernel_size == (5, 5)
    assert model.hr_branch.conv_enc2x.layers[0].stride == (2, 2) and model.hr_branch.conv_enc2x.layers[0].in_channels == 35
    assert [b.layers[0].in_channels for b in model.hr_branch.conv_hr4x] == [99, 64, 64]
    assert [b.layers[0].out_channels for b in model.hr_branch.conv_hr2x] == [64, 32, 32, 32]
    assert [b.layers[0].out_channels for b in model.f_branch.conv_f] == [16, 1]


def test_backbone_matches_torchvision_mobilenet_v2_layout():
    torchvision = pytest.importorskip("torchvision")
    ours = create_model("modnet").backbone.model.features.state_dict()
    theirs = torchvision.models.mobilenet_v2().features.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_forward_outputs_in_both_modes():
    model = create_model("modnet").eval()
    img = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        semantic, detail, matte = model(img, True)
        assert semantic is None and detail is None and matte.shape == (1, 1, 64, 96)
        semantic, detail, matte2 = model(img, inference=False)
    assert semantic.shape == (1, 1, 4, 6) and detail.shape == (1, 1, 64, 96)
    assert torch.allclose(matte, matte2)  # inference only skips the auxiliary heads
    assert 0 < matte.min() and matte.max() < 1


@pytest.mark.parametrize("hr_channels", [16, 48])
def test_other_hr_widths_build_and_run(hr_channels):
    """The HR branch's 4x conv takes 2*hr + the LR branch's 8x channels + 3 image channels (the
    original's 3*hr + 3 holds only at hr = 32)."""
    model = create_model("modnet", hr_channels=hr_channels).eval()
    with torch.no_grad():
        _, detail, matte = model(torch.rand(1, 3, 64, 64), inference=False)
    assert detail.shape == matte.shape == (1, 1, 64, 64)
    assert model.hr_branch.conv_hr4x[0].layers[0].in_channels == 2 * hr_channels + 32 + 3


def test_brief_figures_at_512_via_cli(tmp_path, capsys):
    out = tmp_path / "modnet.json"
    code = main(["analyze", "torchslim:modnet", "--input", "1,3,512,512", "--kwargs", '{"inference": false}',
                 "--no-latency", "--depth", "1", "--top", "5", "--json", str(out)])
    assert code == 0
    report = torchslim.AnalysisReport.from_json(out.read_text())
    terminal = capsys.readouterr().out
    assert "hr_branch" in terminal and "f_branch" in terminal and "18,213" in terminal

    model = create_model("modnet")
    img = torch.randn(1, 3, 512, 512)
    conv_linear_params, conv_linear_macs = _weight_layers(model, img, inference=False)
    # The brief's figures are the weight layers of the training-mode graph ...
    assert round(conv_linear_params / 1e6, 2) == 6.45
    assert abs(conv_linear_macs - BRIEF_MACS) < 0.5e6
    assert report.macs_by_op["aten.convolution"] + report.macs_by_op["aten.mm"] == conv_linear_macs
    # ... and torchslim's total adds the resizes and the SE pooling: within 1% of the brief.
    bilinear = 4 * _bilinear_elements(512, 512)
    se_pool = 1280 * 16 * 16
    assert report.macs_by_op["aten.upsample_bilinear2d"] == bilinear
    assert report.total_macs == conv_linear_macs + bilinear + se_pool
    assert abs(report.total_macs / BRIEF_MACS - 1) < 0.01
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert abs(report.total_params / BRIEF_PARAMS - 1) < 0.01

    # Where the MACs go: the HR and fusion branches, not the backbone.
    rollup = {r.name: r for r in report.rollup(1)}
    assert set(rollup) == {"backbone", "lr_branch", "hr_branch", "f_branch"}
    assert sum(r.macs for r in rollup.values()) == report.total_macs
    assert rollup["hr_branch"].macs + rollup["f_branch"].macs > 0.7 * report.total_macs
    assert rollup["hr_branch"].macs + rollup["f_branch"].macs > 8 * rollup["backbone"].macs
    assert rollup["backbone"].params > 5 * (rollup["hr_branch"].params + rollup["f_branch"].params)
    assert report.top(1)[0].name == "lr_branch.conv_lr16x.layers.0"  # 1280->96 5x5 at 1/16: the single heaviest


def test_inference_mode_undercounts_the_brief():
    model = create_model("modnet")
    img = torch.randn(1, 3, 512, 512)
    _, train_macs = _weight_layers(model, img, inference=False)
    _, infer_macs = _weight_layers(model, img, inference=True)
    conv_lr = 32 * 9 * 32 * 32                       # 32->1 3x3 stride 2 at 1/16
    conv_hr = 35 * 32 * 9 * 512 * 512 + 32 * 512 * 512  # (hr+3)->hr 3x3 and hr->1 1x1 at full size
    assert train_macs - infer_macs == conv_lr + conv_hr
    assert infer_macs / BRIEF_MACS < 0.9
