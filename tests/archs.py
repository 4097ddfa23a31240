"""The test architecture zoo and a random-network generator.

``ARCHS`` maps a name to an :class:`Arch`: calling it returns ``(model, example_inputs)``
with the model in eval mode and every normalisation layer given non-trivial running
statistics and affine parameters (so a zeroing or slicing mistake shows in the outputs).
Every entry is small (inputs like 1x3x16x16, widths 8-32) and exercises one or more
channel-coupling cases the pruning engine must get exactly right.

Flags on an entry:

``expect_pruned``  something must be removed at ratio 0.5 with ``exact_only=True``
                   (False only where the model legitimately has no prunable channel).
``exact``          every prunable group is exact, so removal equals zeroing even with
                   ``exact_only=False``. False where channels feed a statistic over the
                   channel dimension (LayerNorm, GroupNorm, RMSNorm) or attention heads
                   (head-dim pruning changes the softmax scale).
``must_shrink``    state_dict entries that must be smaller after ratio 0.5 with
                   ``exact_only=True``: the coupling case the entry exists for is
                   actually pruned, not merely tolerated by pinning it. ``"a|b"``
                   means at least one of them (a concat group is ranked as a whole,
                   so it may legitimately take all its channels from one producer).
``slow``           large enough (torchvision at 64x64) that the second criterion only
                   runs with ``-m slow``.

The second half of the file is a random-network generator shared by
``tests/test_property.py`` (through hypothesis) and ``benchmarks/property_sweep.py``
(through ``random.Random``): :func:`generate_cnn_spec` / :func:`generate_token_spec`
draw a JSON-serialisable spec from a :class:`Chooser`, :func:`build_from_spec` turns it
into a module and example inputs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _frozen_bn_type() -> type | None:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except Exception:  # noqa: BLE001 - torchvision is a test dependency, but keep the zoo importable
        return None
    return FrozenBatchNorm2d


@torch.no_grad()
def randomize_norms_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every normalisation layer non-trivial statistics and affine parameters; eval mode.

    BatchNorm / InstanceNorm (with running stats) / FrozenBatchNorm2d get running means in
    [-0.5, 0.5) and variances in [0.5, 1.5); every affine weight lands in [0.5, 1.5) and
    every bias in [-0.5, 0.5). LayerNorm, GroupNorm and RMSNorm weights are randomised too.
    """
    gen = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor | None, lo: float, hi: float) -> None:
        if t is not None:
            t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    frozen = _frozen_bn_type()
    norm_types: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    for m in model.modules():
        if isinstance(m, norm_types) or (frozen is not None and isinstance(m, frozen)):
            fill(getattr(m, "running_mean", None), -0.5, 0.5)
            fill(getattr(m, "running_var", None), 0.5, 1.5)
            fill(getattr(m, "weight", None), 0.5, 1.5)
            fill(getattr(m, "bias", None), -0.5, 0.5)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Arch:
    """A zoo entry: ``arch()`` builds ``(model, example_inputs)`` deterministically."""

    build: Callable[[], tuple[nn.Module, Any]]
    expect_pruned: bool = True
    exact: bool = True
    must_shrink: tuple[str, ...] = ()
    slow: bool = False
    notes: str = ""

    def __call__(self) -> tuple[nn.Module, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, inputs = self.build()
        return randomize_norms_(model), inputs


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
            "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "none": nn.Identity(), "relu6": nn.ReLU6()}[name]


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: str = "relu", dilation: int = 1) -> nn.Sequential:
    """conv -> BatchNorm -> activation."""
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), _act(act))


def img(c: int = 3, h: int = 16, w: int | None = None, b: int = 1) -> torch.Tensor:
    return torch.randn(b, c, h, w if w is not None else h)


# ---------------------------------------------------------------------------------------
# convolutional coupling cases
# ---------------------------------------------------------------------------------------


class SerialConv(nn.Module):
    """conv-bn-relu x3 with a dilated conv: the serial (conv1 -> conv2) dependency."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 24, 3, padding=2, dilation=2), nn.BatchNorm2d(24)
        self.conv3, self.bn3 = nn.Conv2d(24, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.head(x)


class OneToMany(nn.Module):
    """One producer read by three consumers (two convs and a pooled linear head)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = nn.Conv2d(16, 4, 3, padding=1)
        self.b = nn.Conv2d(16, 6, 1)
        self.c = nn.Linear(16, 3)

    def forward(self, x):
        s = self.stem(x)
        return self.a(s), self.b(s), self.c(s.mean((2, 3)))


class ResidualAdd(nn.Module):
    """Two residual blocks: the many-to-one coupling of an add."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.block1 = nn.Sequential(cbr(16, 8), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.block2 = nn.Sequential(cbr(16, 24), nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = F.relu(self.block2(x) + x)
        return self.head(x)


class BasicBlockInplace(nn.Module):
    """ResNet BasicBlock with ``out += identity`` and ReLU(inplace=True), downsample shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class InplaceOps(nn.Module):
    """In-place ops everywhere: relu_, F.relu(inplace), +=, mul_, add_, clamp_."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.block = BasicBlockInplace(16, 16, 1)
        self.down = BasicBlockInplace(16, 24, 2)
        self.conv = nn.Conv2d(24, 24, 3, padding=1)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = self.down(x)
        y = self.conv(x)
        y.relu_()
        y.mul_(0.5)
        y.add_(x)
        y = F.relu(y, inplace=True)
        y.clamp_(max=6.0)
        return self.head(y)


class BroadcastArith(nn.Module):
    """sub / mul / div with broadcasting against per-channel params, 1-channel maps and pooled vectors."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.mask = nn.Conv2d(3, 1, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(16, 1, 1))
        self.scale = nn.Parameter(torch.randn(1, 16, 1, 1))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = (a - b) * torch.sigmoid(self.mask(x))  # (B,16,H,W) * (B,1,H,W)
        y = y / (b.abs() + 1.0)
        y = y * a.mean((2, 3), keepdim=True)  # per-sample channel vector
        y = (y - self.shift) * self.scale
        y = y + 0.5 * a.amax((2, 3), keepdim=True)
        return self.head(y)


class SEGate(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc(pool(x))).view(b, c, 1, 1)."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c, c // r)
        self.fc2 = nn.Linear(c // r, c)

    def forward(self, x):
        b, c, _, _ = x.shape
        w = self.pool(x).view(b, c)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w.view(b, c, 1, 1)


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.conv = cbr(16, 32)
        self.se = SEGate(32)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(self.se(self.conv(self.stem(x))))


class SEConvNet(nn.Module):
    """torchvision's SqueezeExcitation (1x1 convs, scale * input) inside an inverted residual."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import SqueezeExcitation

        self.stem = cbr(3, 16)
        self.expand = cbr(16, 32, 1, act="silu")
        self.dw = cbr(32, 32, 3, groups=32, act="silu")
        self.se = SqueezeExcitation(32, 8)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        return self.head(x)


class LayerScale(nn.Module):
    """A layer-scale vector parameter (x * self.gamma) on a residual branch."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.branch = nn.Sequential(cbr(16, 32), nn.Conv2d(32, 16, 1))
        self.gamma = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.branch(x) * self.gamma
        return self.head(x)


class ConcatChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(3, 12, 1)
        self.c = cbr(20, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.c(torch.cat([self.a(x), self.b(x)], dim=1)))


class ConcatSameTwice(nn.Module):
    """torch.cat([y, y]): one producer channel appears twice in the consumer."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 12)
        self.b = cbr(24, 16)
        self.head = nn.Conv2d(16, 4, 1)
        self.aux = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.b(torch.cat([y, y], 1))
        return self.head(z), self.aux(y)


class ConcatInput(nn.Module):
    """Concat with the raw image (MODNet's skip from the input)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16 + 3, 16)
        self.head = nn.Conv2d(16 + 3, 2, 1)

    def forward(self, x):
        y = self.b(torch.cat([x, self.a(x)], 1))
        return self.head(torch.cat([y, x], 1))


class ConcatConstant(nn.Module):
    """Concat with a registered constant buffer and with a tensor created in forward."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.register_buffer("coords", torch.randn(1, 2, 1, 1))
        self.b = cbr(16 + 2 + 1, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        b, _, h, w = y.shape
        ones = torch.ones(b, 1, h, w, dtype=y.dtype)
        y = torch.cat([y, self.coords.expand(b, -1, h, w), ones], 1)
        return self.head(self.b(y))


class ConcatNonChannel(nn.Module):
    """Concat along H and along W: both inputs' channels must be pruned identically."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(3, 16, 1)
        self.c = cbr(16, 12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=2)  # (B,16,2H,W)
        y = self.c(y)
        y = torch.cat([y, y.flip(-1)], dim=3)  # (B,12,2H,2W)
        return self.head(y)


class SplitChunk(nn.Module):
    """chunk(2), split(int) and split(sizes held in an attribute) on the channel dim."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.left = cbr(8, 8)
        self.right = cbr(8, 8)
        self.b = cbr(16, 24)
        self.sizes = [8, 16]
        self.p = nn.Conv2d(8, 4, 1)
        self.q = nn.Conv2d(16, 4, 1)
        self.c = cbr(16, 12)
        self.r = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        half_l, half_r = self.a(x).chunk(2, dim=1)
        y = torch.cat([self.left(half_l), self.right(half_r)], 1)
        u, v = torch.split(self.b(y), self.sizes, dim=1)
        parts = self.c(y).split(6, dim=1)
        return self.p(u) + self.q(v), self.r(parts[0] * parts[1])


class C2f(nn.Module):
    """YOLOv8's C2f: cv1 -> split((c, c), 1) with the size in an attribute -> bottlenecks -> cat -> cv2."""

    def __init__(self, c1: int = 16, c2: int = 16, n: int = 2):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = cbr(c1, 2 * self.c, 1, act="silu")
        self.cv2 = cbr((2 + n) * self.c, c2, 1, act="silu")
        self.m = nn.ModuleList(nn.Sequential(cbr(self.c, self.c, act="silu"), cbr(self.c, self.c, act="silu")) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class C2fNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, act="silu")
        self.c2f = C2f()
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.c2f(self.stem(x)))


class NarrowSlice(nn.Module):
    """narrow and x[:, a:b] with bounds in attributes; the pieces take separate paths."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 24)
        self.n = 8
        self.lo, self.hi = 8, 20
        self.p = cbr(8, 8)
        self.q = cbr(12, 8)
        self.r = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        first = y.narrow(1, 0, self.n)
        mid = y[:, self.lo:self.hi]
        last = y[:, self.hi:]
        return self.head(self.p(first) + self.q(mid) + self.r(last))


class IndexSelect(nn.Module):
    """index_select on channels with an index buffer (a subset in a shuffled order)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.register_buffer("index", torch.tensor([3, 0, 7, 12, 5, 9, 14, 1, 10, 6]))
        self.b = cbr(10, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.b(self.a(x).index_select(1, self.index)))


class Unbind(nn.Module):
    """unbind over the channel dim (rebuilt by stack) and over H (summed)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 12)
        self.b = cbr(12, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.stack(self.a(x).unbind(1), dim=1)
        z = self.b(y)
        rows = z.unbind(2)  # H tensors of (B, C, W)
        s = sum(rows)
        return self.head(s.mean(-1))


class Depthwise(nn.Module):
    """MobileNetV1 separable blocks: depthwise 3x3 (groups=C) + pointwise, and a x2 depth multiplier."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, stride=2)
        self.dw1, self.pw1 = cbr(16, 16, groups=16), cbr(16, 24, 1)
        self.dw2 = cbr(24, 48, groups=24)  # depth multiplier 2
        self.pw2 = cbr(48, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.pw1(self.dw1(self.stem(x)))
        return self.head(self.pw2(self.dw2(x)))


class Grouped(nn.Module):
    """Grouped convs (groups=4), a channel shuffle between them (ShuffleNet v1)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.g1 = cbr(16, 32, 1, groups=4)
        self.g2 = cbr(32, 32, 3, groups=4)
        self.g3 = nn.Conv2d(32, 16, 1, groups=4)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.g1(self.stem(x))
        b, c, h, w = y.shape
        y = y.view(b, 4, c // 4, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.head(self.g3(self.g2(y)))


class ChannelShuffle(nn.Module):
    """ShuffleNet v2 unit: chunk, branch, cat, channel shuffle (view-transpose-view)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.branch = nn.Sequential(cbr(8, 8, 1), cbr(8, 8, groups=8, act="none"), cbr(8, 8, 1))
        self.head = nn.Conv2d(16, 4, 1)

    @staticmethod
    def shuffle(x, groups: int = 2):
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, -1, h, w)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(2):
            a, b = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat((a, self.branch(b)), 1))
        return self.head(x)


class Transposed(nn.Module):
    """ConvTranspose2d upsampling (stride 2), a second transposed conv (plain or groups=2), then a conv."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.enc = cbr(3, 16, stride=2)
        self.up = nn.ConvTranspose2d(16, 24, 2, stride=2)
        self.bn = nn.BatchNorm2d(24)
        self.up2 = nn.ConvTranspose2d(24, 16, 3, stride=1, padding=1, groups=groups)
        self.head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.bn(self.up(self.enc(x))))
        return self.head(F.relu(self.up2(y)))


class Conv1dNet(nn.Module):
    """Conv1d / BatchNorm1d / ConvTranspose1d on (B, C, L)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 24, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm1d(24)
        self.up = nn.ConvTranspose1d(24, 16, 2, stride=2)
        self.head = nn.Conv1d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.gelu(self.bn2(self.c2(x)))
        return self.head(F.relu(self.up(x)))


class Conv3dNet(nn.Module):
    """Conv3d / BatchNorm3d / MaxPool3d on (B, C, T, H, W)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(12)
        self.c2 = nn.Conv3d(12, 16, (1, 3, 3), padding=(0, 1, 1))
        self.bn2 = nn.BatchNorm3d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.bn1(self.c1(x))), 2)
        x = F.relu(self.bn2(self.c2(x)))
        return self.head(x.mean((2, 3, 4)))


class BN1dMLP(nn.Module):
    """Linear -> BatchNorm1d on (B, C) and on (B, C, L)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.fc2, self.bn2 = nn.Linear(32, 24), nn.BatchNorm1d(24)
        self.fc3 = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


class InstanceNormNet(nn.Module):
    """InstanceNorm2d with and without affine parameters (per-channel statistics: exact)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.in1 = nn.InstanceNorm2d(16, affine=True)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.in2 = nn.InstanceNorm2d(16, affine=False)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.in1(self.c1(x)))
        x = F.relu(self.in2(self.c2(x)))
        return self.head(x)


class GroupNormNet(nn.Module):
    """GroupNorm(4, 16) (statistics over channel groups: inexact) next to an exact BN path."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = cbr(16, 24)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.head(self.c2(F.relu(self.gn(self.c1(x)))))


class FrozenBNNet(nn.Module):
    """torchvision's FrozenBatchNorm2d (buffers only) between two convs."""

    def __init__(self):
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> permute to channels-last -> LayerNorm -> Linear 4x -> GELU -> Linear -> gamma -> permute back."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        return shortcut + x.permute(0, 3, 1, 2)


class ConvNeXtMini(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.stem_norm = nn.LayerNorm(16)
        self.blocks = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.stem_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.blocks(x)
        return self.head(x.mean((-2, -1)))


class ReshapeOps(nn.Module):
    """view / reshape / flatten / permute / transpose between convs and linears."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8, stride=2)  # (B, 8, 8, 8)
        self.cl = nn.Linear(8, 12)  # channels-last linear after permute
        self.b = cbr(12, 16, stride=2)  # (B, 16, 4, 4)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        y = self.a(x)
        y = self.cl(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = y.transpose(2, 3).contiguous()
        b, c, h, w = y.shape
        y = y.reshape(b, c, h * w).view(b, c, h, w)
        y = self.b(y)
        y = torch.flatten(y, 1)
        return self.fc2(F.relu(self.fc1(y)))


class PixelShuffleNet(nn.Module):
    """PixelShuffle(2) (4 input channels per output channel) and PixelUnshuffle(2)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.b = cbr(8, 8, stride=2)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.c = cbr(32, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.b(self.shuffle(F.relu(self.a(x))))  # (B, 8, 16, 16)
        return self.head(self.c(self.unshuffle(y)))  # (B, 32, 8, 8)


class PoolInterpAct(nn.Module):
    """max / avg / adaptive pooling, F.interpolate (nearest, bilinear), ReLU / GELU / SiLU / Hardswish, dropout."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(), nn.Dropout(0.3))
        self.c = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.Hardswish(), nn.Dropout2d(0.2))
        self.d = nn.Sequential(nn.Conv2d(24, 16, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.max_pool2d(self.a(x), 2)  # 8x8
        y = F.avg_pool2d(self.b(y), 2)  # 4x4
        y = F.interpolate(y, scale_factor=2, mode="nearest")  # 8x8
        y = self.c(y)
        y = F.adaptive_max_pool2d(y, 6) + F.adaptive_avg_pool2d(y, 6)
        y = F.interpolate(self.d(y), size=(16, 16), mode="bilinear", align_corners=False)
        return self.head(y)


class DilatedGroupedMix(nn.Module):
    """Dilated conv (seeds/004) followed by grouped conv with a residual."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.dil = cbr(16, 16, dilation=2)
        self.grp = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(F.relu(x + self.grp(self.dil(x))))


class SharedConv(nn.Module):
    """The same conv module applied twice: its in and out channels are one group."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.shared(F.relu(self.shared(x)))
        return self.head(F.relu(x))


class EinsumRootParam(nn.Module):
    """A 1x1 'conv' written as einsum with a parameter on the root module."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.mix = nn.Parameter(torch.randn(24, 16) / 4)
        self.bias = nn.Parameter(torch.randn(24))
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        y = torch.einsum("bchw,dc->bdhw", self.stem(x), self.mix) + self.bias[:, None, None]
        return self.head(F.relu(y))


class SingleConv(nn.Module):
    """Nothing to prune: input and output channels are fixed by the example input and outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


# ---------------------------------------------------------------------------------------
# MODNet-like mini network with IBNorm
# ---------------------------------------------------------------------------------------


class IBNorm(nn.Module):
    """MODNet's IBNorm: BatchNorm on x[:, :split], InstanceNorm on the rest, concatenated."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.bnorm_channels = int(in_channels / 2)
        self.inorm_channels = in_channels - self.bnorm_channels
        self.bnorm = nn.BatchNorm2d(self.bnorm_channels, affine=True)
        self.inorm = nn.InstanceNorm2d(self.inorm_channels, affine=False)

    def forward(self, x):
        bn_x = self.bnorm(x[:, : self.bnorm_channels, ...].contiguous())
        in_x = self.inorm(x[:, self.bnorm_channels :, ...].contiguous())
        return torch.cat((bn_x, in_x), 1)


class Conv2dIBNormRelu(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, with_ibn=True, with_relu=True):
        super().__init__()
        layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=padding)]
        if with_ibn:
            layers.append(IBNorm(cout))
        if with_relu:
            layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class MODNetSE(nn.Module):
    """MODNet's SEBlock: pool -> view(b, c) -> Linear/ReLU/Linear/Sigmoid -> view(b, c, 1, 1) -> expand_as."""

    def __init__(self, cin, cout, reduction=1):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(cin, int(cin // reduction), bias=False), nn.ReLU(inplace=True),
                                nn.Linear(int(cin // reduction), cout, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        w = self.pool(x).view(b, c)
        w = self.fc(w).view(b, c, 1, 1)
        return x * w.expand_as(x)


class MiniMODNet(nn.Module):
    """Backbone -> LR branch (SE, 5x5, IBNorm) / HR branch (concat image at 1/2 and 1/4, skips) / fusion."""

    def __init__(self):
        super().__init__()
        # backbone: enc2x (1/2, 8), enc4x (1/4, 12), enc8x (1/8, 24)
        self.enc2x = nn.Sequential(cbr(3, 8, stride=2, act="relu6"), cbr(8, 8, groups=8, act="relu6"))
        self.enc4x = nn.Sequential(cbr(8, 16, 1, act="relu6"), cbr(16, 16, stride=2, groups=16, act="relu6"),
                                   nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12))
        self.enc8x = nn.Sequential(cbr(12, 24, stride=2, act="relu6"))
        # LR branch
        self.se_block = MODNetSE(24, 24, reduction=4)
        self.conv_lr8x = Conv2dIBNormRelu(24, 12, 5, padding=2)
        self.conv_lr = Conv2dIBNormRelu(12, 1, 3, padding=1, with_ibn=False, with_relu=False)
        # HR branch
        self.tohr_enc2x = Conv2dIBNormRelu(8, 8, 1)
        self.conv_enc2x = Conv2dIBNormRelu(8 + 3, 8, 3, stride=2, padding=1)
        self.tohr_enc4x = Conv2dIBNormRelu(12, 8, 1)
        self.conv_enc4x = Conv2dIBNormRelu(8 + 8, 16, 3, padding=1)
        self.conv_hr4x = nn.Sequential(Conv2dIBNormRelu(16 + 12 + 3, 16, 3, padding=1),
                                       Conv2dIBNormRelu(16, 8, 3, padding=1))
        self.conv_hr2x = Conv2dIBNormRelu(8 + 8, 8, 3, padding=1)
        self.conv_hr = nn.Sequential(Conv2dIBNormRelu(8 + 3, 8, 3, padding=1),
                                     Conv2dIBNormRelu(8, 1, 1, with_ibn=False, with_relu=False))
        # fusion
        self.conv_lr4x = Conv2dIBNormRelu(12, 8, 5, padding=2)
        self.conv_f2x = Conv2dIBNormRelu(8 + 8, 8, 3, padding=1)
        self.conv_f = nn.Sequential(Conv2dIBNormRelu(8 + 3, 4, 3, padding=1),
                                    Conv2dIBNormRelu(4, 1, 1, with_ibn=False, with_relu=False))

    def forward(self, img, inference: bool = False):
        enc2x = self.enc2x(img)
        enc4x = self.enc4x(enc2x)
        enc8x = self.enc8x(enc4x)
        # LR
        lr = self.se_block(enc8x)
        lr8x = self.conv_lr8x(lr)
        pred_semantic = None if inference else torch.sigmoid(self.conv_lr(lr8x))
        lr4x = F.interpolate(lr8x, scale_factor=2, mode="bilinear", align_corners=False)
        # HR
        img2x = F.interpolate(img, scale_factor=1 / 2, mode="bilinear", align_corners=False)
        img4x = F.interpolate(img, scale_factor=1 / 4, mode="bilinear", align_corners=False)
        enc2x_hr = self.tohr_enc2x(enc2x)
        hr4x = self.conv_enc2x(torch.cat((img2x, enc2x_hr), dim=1))
        enc4x_hr = self.tohr_enc4x(enc4x)
        hr4x = self.conv_enc4x(torch.cat((hr4x, enc4x_hr), dim=1))
        hr4x = self.conv_hr4x(torch.cat((hr4x, lr4x, img4x), dim=1))
        hr2x = F.interpolate(hr4x, scale_factor=2, mode="bilinear", align_corners=False)
        hr2x = self.conv_hr2x(torch.cat((hr2x, enc2x_hr), dim=1))
        pred_detail = None
        if not inference:
            hr = F.interpolate(hr2x, scale_factor=2, mode="bilinear", align_corners=False)
            pred_detail = torch.sigmoid(self.conv_hr(torch.cat((hr, img), dim=1)))
        # fusion
        f4x = self.conv_lr4x(lr4x)
        f2x = F.interpolate(f4x, scale_factor=2, mode="bilinear", align_corners=False)
        f = self.conv_f2x(torch.cat((f2x, hr2x), dim=1))
        f = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False)
        pred_matte = torch.sigmoid(self.conv_f(torch.cat((f, img), dim=1)))
        return pred_semantic, pred_detail, pred_matte


# ---------------------------------------------------------------------------------------
# linear, embedding and attention models
# ---------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))


class EmbeddingLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 5)

    def forward(self, ids):
        return self.fc2(F.relu(self.fc1(self.emb(ids))))


class PReLUNet(nn.Module):
    """Face-recognition / ENet style: conv -> BN -> PReLU(C) per channel, a shared-slope PReLU."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PReLU(16))
        self.b = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.PReLU())
        self.head = nn.Conv2d(24, 4, 1)
        with torch.no_grad():
            self.a[2].weight.uniform_(-1, 1)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


class GroupedUpsample(nn.Module):
    """A grouped ConvTranspose2d (groups=4) between two plain convs (decoder upsampling)."""

    def __init__(self):
        super().__init__()
        self.enc = cbr(3, 32)
        self.up = nn.ConvTranspose2d(32, 32, 2, stride=2, groups=4)
        self.dec = nn.Sequential(nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 3, 3, padding=1))

    def forward(self, x):
        return self.dec(self.up(self.enc(x)))


class CRNN(nn.Module):
    """Text recognition (CRNN): conv features, columns as a sequence, a 2-layer BiLSTM, per-step classes."""

    def __init__(self):
        super().__init__()
        self.cnn = nn.Sequential(cbr(1, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2))
        self.rnn = nn.LSTM(32 * 2, 24, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(48, 11)

    def forward(self, x):
        f = self.cnn(x)  # (B, 32, 2, W/4)
        seq = f.flatten(1, 2).permute(2, 0, 1)  # (W/4, B, 64)
        return self.fc(self.rnn(seq)[0])


class GRUTagger(nn.Module):
    """Embedding -> stacked GRU (batch first) -> Linear tagger."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.rnn = nn.GRU(16, 24, num_layers=2, batch_first=True)
        self.fc = nn.Linear(24, 6)

    def forward(self, ids):
        return self.fc(self.rnn(self.emb(ids))[0])


class TiedEmbeddingLM(nn.Module):
    """Embedding whose weight is tied with the LM head, a residual MLP in between."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 24)
        self.up = nn.Linear(24, 48)
        self.down = nn.Linear(48, 24)
        self.lm_head = nn.Linear(24, 40, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(F.gelu(self.up(h)))
        return self.lm_head(h)


class MHAModel(nn.Module):
    """nn.MultiheadAttention (batch_first) between projections, with an MLP head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.head(h + a)


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF's repeat_kv: (b, kv, s, d) -> (b, kv * n_rep, s, d) via expand + reshape."""
    b, kv, s, d = hidden.shape
    if n_rep == 1:
        return hidden
    hidden = hidden[:, :, None, :, :].expand(b, kv, n_rep, s, d)
    return hidden.reshape(b, kv * n_rep, s, d)


class HFAttention(nn.Module):
    """HF-style attention: q/k/v/o Linear, view to heads, transpose, matmul-softmax or SDPA, GQA."""

    def __init__(self, hidden: int = 32, num_heads: int = 4, num_kv_heads: int | None = None, sdpa: bool = False):
        super().__init__()
        self.hidden_size = hidden
        self.num_heads = num_heads
        self.num_key_value_heads = num_kv_heads or num_heads
        self.head_dim = hidden // num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.sdpa = sdpa
        self.q_proj = nn.Linear(hidden, num_heads * self.head_dim)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden)

    def forward(self, hidden_states):
        bsz, q_len, _ = hidden_states.size()
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attn = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
            attn = F.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(attn, v)
        out = out.transpose(1, 2).contiguous()
        out = out.reshape(bsz, q_len, self.num_heads * self.head_dim)
        return self.o_proj(out)


class SwiGLU(nn.Module):
    """LLaMA MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AttentionNoNorm(nn.Module):
    """Linear embed -> attention residual -> MLP residual -> head (no normalisation)."""

    def __init__(self, sdpa: bool = False, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = HFAttention(32, heads, sdpa=sdpa)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        h = h + self.mlp(h)
        return self.head(h)


class LlamaMini(nn.Module):
    """RMSNorm + grouped-query attention (8 heads, 2 kv heads) + SwiGLU, tied-free head."""

    def __init__(self, sdpa: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(30, 32)
        self.input_layernorm = nn.RMSNorm(32, eps=1e-6)
        self.self_attn = HFAttention(32, 8, 2, sdpa=sdpa)
        self.post_attention_layernorm = nn.RMSNorm(32, eps=1e-6)
        self.mlp = SwiGLU(32, 48)
        self.norm = nn.RMSNorm(32, eps=1e-6)
        self.lm_head = nn.Linear(32, 30, bias=False)

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        h = h + self.self_attn(self.input_layernorm(h))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return self.lm_head(self.norm(h))


class RMSNormMLP(nn.Module):
    """Linear -> RMSNorm -> MLP: the normed width is inexact, the hidden width is exact."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 24)
        self.norm = nn.RMSNorm(24)
        self.fc1 = nn.Linear(24, 48)
        self.fc2 = nn.Linear(48, 6)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(self.norm(self.inp(x)))))


class TimmAttention(nn.Module):
    """timm's Attention: fused qkv Linear, reshape(B, N, 3, heads, hd).permute, unbind(0)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class RelPosWindowAttention(nn.Module):
    """Swin/MaxViT-style window attention: a relative-position bias table gathered by an
    integer index buffer and viewed with literal window sizes. The index buffer's positions
    hold no weight, so they must never be pruned (tokens are not channels)."""

    def __init__(self, dim: int = 16, heads: int = 2, window: int = 4):
        super().__init__()
        self.heads, self.n = heads, window * window
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # [B, 16 tokens, dim]
        B, N, C = t.shape
        q, k, v = self.qkv(t).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(self.n, self.n, -1).permute(2, 0, 1)
        attn = ((q @ k.transpose(-2, -1)) * 0.25 + bias).softmax(-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return self.head(out.mean(1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """Patch embedding conv, class token and position embedding as parameters on the root module."""

    def __init__(self, img_size: int = 16, patch: int = 4, dim: int = 32, depth: int = 2, heads: int = 4):
        super().__init__()
        n = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.5)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# ---------------------------------------------------------------------------------------
# calling conventions and output containers
# ---------------------------------------------------------------------------------------


class MultiInput(nn.Module):
    """forward(x, y): two images of different sizes merged by an add (many-to-one across inputs)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(1, 16, stride=2)
        self.c = cbr(16, 12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x, y):
        return self.head(self.c(F.max_pool2d(self.a(x), 2) + self.b(y)))


class KeywordInput(nn.Module):
    """forward(x, flag=True, scale=None): a Python bool selects the path, a tensor kwarg scales."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 16)
        self.c = cbr(16, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x, flag: bool = True, scale: torch.Tensor | None = None):
        y = self.a(x)
        y = self.b(y) if flag else self.c(y)
        if scale is not None:
            y = y * scale
        return self.head(y)


class TupleOutput(nn.Module):
    """Returns (features, logits): the feature map's channels are an output and stay."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 8, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        f = self.b(self.a(x))
        return f, self.fc(f.mean((2, 3)))


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 24, stride=2)
        self.seg = nn.Conv2d(24, 3, 1)
        self.cls = nn.Linear(24, 5)

    def forward(self, x):
        f = self.b(self.a(x))
        return {"seg": self.seg(f), "logits": self.cls(f.amax((2, 3))), "aux": [f.sum((1, 2, 3))]}


def _tv(name: str, size: int = 64):
    def build():
        import torchvision

        return torchvision.models.get_model(name, weights=None), img(3, size)

    return build


def _wrap(fn: Callable[[], nn.Module], inputs: Callable[[], Any]) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (fn(), inputs())


ARCHS: dict[str, Arch] = {
    # serial / fan-out / fan-in
    "serial_conv_bn_relu": Arch(_wrap(SerialConv, lambda: img()), must_shrink=("conv1.weight", "bn2.running_mean")),
    "one_to_many": Arch(_wrap(OneToMany, lambda: img()), must_shrink=("stem.1.running_var", "c.weight")),
    "residual_add": Arch(_wrap(ResidualAdd, lambda: img()), must_shrink=("block1.0.0.weight",)),
    "inplace_ops": Arch(_wrap(InplaceOps, lambda: img()), must_shrink=("block.conv1.weight",)),
    "broadcast_sub_mul_div": Arch(_wrap(BroadcastArith, lambda: img()), must_shrink=("shift",)),
    "shared_conv": Arch(_wrap(SharedConv, lambda: img()), must_shrink=("shared.weight",)),
    # gating / scaling
    "se_gating": Arch(_wrap(SENet, lambda: img()), must_shrink=("se.fc1.weight", "se.fc2.weight")),
    "se_torchvision": Arch(_wrap(SEConvNet, lambda: img()), must_shrink=("se.fc1.weight", "dw.0.weight")),
    "layer_scale": Arch(_wrap(LayerScale, lambda: img()), must_shrink=("branch.0.0.weight", "gamma")),
    # concat
    "concat_channels": Arch(_wrap(ConcatChannels, lambda: img()), must_shrink=("a.0.weight|b.0.weight", "c.0.weight")),
    "concat_same_twice": Arch(_wrap(ConcatSameTwice, lambda: img()), must_shrink=("a.0.weight", "b.0.weight")),
    "concat_input_image": Arch(_wrap(ConcatInput, lambda: img()), must_shrink=("a.0.weight", "b.0.weight")),
    "concat_constant": Arch(_wrap(ConcatConstant, lambda: img()), must_shrink=("a.0.weight",)),
    "concat_non_channel": Arch(_wrap(ConcatNonChannel, lambda: img()), must_shrink=("a.0.weight", "b.0.weight", "c.0.weight")),
    # split / slice
    "split_chunk": Arch(_wrap(SplitChunk, lambda: img()), must_shrink=("left.0.weight|right.0.weight", "a.0.weight")),
    "c2f_split_attr": Arch(_wrap(C2fNet, lambda: img()), must_shrink=("c2f.m.0.0.0.weight",)),
    "narrow_slice": Arch(_wrap(NarrowSlice, lambda: img()), must_shrink=("a.0.weight",)),
    "index_select": Arch(_wrap(IndexSelect, lambda: img()), must_shrink=("b.0.weight",)),
    "unbind": Arch(_wrap(Unbind, lambda: img()), must_shrink=("b.0.weight",)),
    # conv variants
    "depthwise": Arch(_wrap(Depthwise, lambda: img()), must_shrink=("dw1.0.weight", "dw2.0.weight")),
    "grouped_conv_shuffle": Arch(_wrap(Grouped, lambda: img()), must_shrink=("g2.0.weight",)),
    "channel_shuffle_v2": Arch(_wrap(ChannelShuffle, lambda: img()), must_shrink=("branch.0.0.weight",)),
    "conv_transpose": Arch(_wrap(Transposed, lambda: img()), must_shrink=("up.weight", "bn.running_mean", "up2.bias")),
    "conv_transpose_grouped": Arch(_wrap(lambda: Transposed(groups=2), lambda: img()), must_shrink=("up.weight",),
                                   notes="up's 24 outputs feed a groups=2 transposed conv: balanced removal or pinned"),
    "conv1d_transpose1d": Arch(_wrap(Conv1dNet, lambda: torch.randn(2, 3, 20)), must_shrink=("c1.weight", "up.weight")),
    "conv3d": Arch(_wrap(Conv3dNet, lambda: torch.randn(1, 3, 4, 8, 8)), must_shrink=("c1.weight", "bn2.running_var")),
    "dilated_grouped_residual": Arch(_wrap(DilatedGroupedMix, lambda: img()), must_shrink=("dil.0.weight",)),
    "einsum_root_param": Arch(_wrap(EinsumRootParam, lambda: img()), must_shrink=("stem.0.weight",)),
    # norms
    "batchnorm1d_mlp": Arch(_wrap(BN1dMLP, lambda: torch.randn(4, 16)), must_shrink=("bn1.running_mean", "bn2.weight")),
    "instancenorm": Arch(_wrap(InstanceNormNet, lambda: img()), must_shrink=("in1.weight", "c2.weight")),
    "groupnorm": Arch(_wrap(GroupNormNet, lambda: img()), exact=False, must_shrink=("c2.0.weight",)),
    "frozen_batchnorm": Arch(_wrap(FrozenBNNet, lambda: img()), must_shrink=("bn1.running_mean", "conv1.weight")),
    "convnext_layernorm_cl": Arch(_wrap(ConvNeXtMini, lambda: img()), exact=False,
                                  must_shrink=("blocks.0.pwconv1.weight",)),
    "rmsnorm_mlp": Arch(_wrap(RMSNormMLP, lambda: torch.randn(2, 5, 12)), exact=False, must_shrink=("fc1.weight",)),
    # shapes, spatial ops
    "reshape_permute_flatten": Arch(_wrap(ReshapeOps, lambda: img()), must_shrink=("a.0.weight", "fc1.weight")),
    "pixel_shuffle": Arch(_wrap(PixelShuffleNet, lambda: img()), must_shrink=("a.weight", "b.0.weight")),
    "pool_interp_act_dropout": Arch(_wrap(PoolInterpAct, lambda: img()), must_shrink=("a.0.weight", "c.0.weight")),
    # linear / embedding / attention
    "linear_mlp": Arch(_wrap(mlp, lambda: torch.randn(4, 16)), must_shrink=("0.weight", "3.weight")),
    "embedding_linear": Arch(_wrap(EmbeddingLinear, lambda: torch.randint(0, 50, (2, 7))), must_shrink=("emb.weight", "fc1.weight")),
    "prelu_per_channel": Arch(_wrap(PReLUNet, lambda: img()), must_shrink=("a.2.weight", "b.0.weight")),
    "grouped_conv_transpose": Arch(_wrap(GroupedUpsample, lambda: img(3, 8)), must_shrink=("up.weight", "enc.0.weight")),
    "crnn_bilstm": Arch(_wrap(CRNN, lambda: img(1, 8, 32, b=2)),
                        must_shrink=("cnn.2.0.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l1_reverse")),
    "gru_tagger": Arch(_wrap(GRUTagger, lambda: torch.randint(0, 40, (2, 7))),
                       must_shrink=("emb.weight", "rnn.weight_hh_l0", "rnn.weight_ih_l1")),
    "tied_embedding_lm": Arch(_wrap(TiedEmbeddingLM, lambda: torch.randint(0, 40, (2, 6))), must_shrink=("up.weight",)),
    "multihead_attention": Arch(_wrap(MHAModel, lambda: torch.randn(2, 5, 8)), exact=False, must_shrink=("head.0.weight",)),
    "hf_attention": Arch(_wrap(AttentionNoNorm, lambda: torch.randn(2, 6, 8)), exact=False, must_shrink=("mlp.0.weight",)),
    "hf_attention_single_head": Arch(_wrap(lambda: AttentionNoNorm(heads=1), lambda: torch.randn(2, 6, 8)), exact=False,
                                     must_shrink=("mlp.0.weight",),
                                     notes="head_dim is the whole q/k width: pruning it changes 1/sqrt(head_dim)"),
    "hf_attention_sdpa": Arch(_wrap(lambda: AttentionNoNorm(sdpa=True), lambda: torch.randn(2, 6, 8)), exact=False,
                              must_shrink=("mlp.0.weight",)),
    # batch 3: a batch of 2 would equal the kv-head count, a literal the surgery cannot tell apart
    "llama_gqa_rmsnorm_swiglu": Arch(_wrap(LlamaMini, lambda: torch.randint(0, 30, (3, 6))), exact=False,
                                     must_shrink=("mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.k_proj.weight")),
    "llama_gqa_sdpa": Arch(_wrap(lambda: LlamaMini(sdpa=True), lambda: torch.randint(0, 30, (3, 6))), exact=False,
                           must_shrink=("mlp.gate_proj.weight", "self_attn.k_proj.weight")),
    "relpos_window_attention": Arch(_wrap(RelPosWindowAttention, lambda: img(3, 4)), exact=False,
                                    must_shrink=("proj.weight",)),
    "vit_cls_pos_embed": Arch(_wrap(TinyViT, lambda: img(3, 16, b=2)), exact=False, must_shrink=("blocks.0.fc1.weight",)),
    # MODNet
    "modnet_mini": Arch(_wrap(MiniMODNet, lambda: ((img(3, 32),), {"inference": False})),
                        must_shrink=("conv_lr8x.layers.0.weight", "conv_hr4x.0.layers.0.weight")),
    "modnet_mini_inference": Arch(_wrap(MiniMODNet, lambda: ((img(3, 32),), {"inference": True}))),
    # calling conventions / outputs
    "multi_input": Arch(_wrap(MultiInput, lambda: (img(3, 16), img(1, 16))), must_shrink=("a.0.weight", "c.0.weight")),
    "keyword_input_flag": Arch(_wrap(KeywordInput, lambda: ((img(),), {"flag": False})), must_shrink=("c.0.weight",)),
    "keyword_input_tensor": Arch(_wrap(KeywordInput, lambda: ((img(),), {"flag": True, "scale": torch.rand(1, 16, 1, 1) + 0.5})),
                                 notes="the kwarg tensor's channel dim is an input: pinned, so b's out channels stay"),
    "tuple_output": Arch(_wrap(TupleOutput, lambda: img()), must_shrink=("a.0.weight",)),
    "dict_output": Arch(_wrap(DictOutput, lambda: img()), must_shrink=("a.0.weight", "b.0.weight")),
    "nothing_prunable": Arch(_wrap(SingleConv, lambda: img()), expect_pruned=False),
    # torchvision
    "tv_resnet18": Arch(_tv("resnet18"), slow=True, must_shrink=("layer1.0.conv1.weight",)),
    "tv_mobilenet_v2": Arch(_tv("mobilenet_v2"), slow=True, must_shrink=("features.1.conv.0.0.weight",)),
    "tv_shufflenet_v2_x0_5": Arch(_tv("shufflenet_v2_x0_5"), slow=True, must_shrink=("stage2.0.branch2.0.weight",)),
}


# ---------------------------------------------------------------------------------------
# random networks (property tests and the sweep benchmark)
# ---------------------------------------------------------------------------------------


class Chooser(Protocol):
    """Where the generator's decisions come from (hypothesis ``draw`` or ``random.Random``)."""

    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence[Any]) -> Any: ...


class RandomChooser:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]


ACTS = ("relu", "gelu", "silu", "hardswish", "sigmoid", "tanh", "none")
# ops whose channels feed a statistic over the channel dimension: removal != zeroing there
INEXACT_OPS = frozenset({"groupnorm", "layernorm_cl", "attention", "layernorm", "rmsnorm"})

CNN_OPS = ("conv", "residual", "binary", "cat", "chunk", "split_attr", "slice_attr", "se", "layer_scale", "shuffle",
           "pixel_shuffle", "pixel_unshuffle", "pool", "upsample", "conv_transpose", "norm", "act", "permute_linear",
           "transpose_hw", "cat_spatial", "index_select", "dropout")
TOKEN_OPS = ("linear", "mlp_residual", "swiglu", "attention", "norm", "act", "binary", "cat", "chunk", "gate")
# how often each op is drawn (ops that create prunable widths more often)
OP_WEIGHTS = {"conv": 6, "residual": 2, "binary": 2, "cat": 2, "linear": 3, "mlp_residual": 2, "attention": 2}


def _weighted(ops: Sequence[str]) -> tuple[str, ...]:
    return tuple(op for op in ops for _ in range(OP_WEIGHTS.get(op, 1)))


def _divisors(n: int, options: Sequence[int]) -> list[int]:
    return [g for g in options if n % g == 0]


def generate_cnn_spec(ch: Chooser, max_ops: int = 10, ops: Sequence[str] = CNN_OPS,
                      literal: bool = False) -> dict[str, Any]:
    """A random DAG of CNN blocks over (B, C, H, W) tensors. Plain JSON data.

    A conv stem, then up to ``max_ops`` blocks, each reading earlier tensors (biased to the
    most recent; the image stays reachable) and appending its outputs.
    ``literal=True`` inserts one block that uses a hard-coded channel count.
    """
    c0 = ch.choice((3, 1, 4))
    h0, w0 = ch.choice((16, 8, 12)), ch.choice((16, 8))
    shapes: list[tuple[int, int, int]] = [(c0, h0, w0)]
    steps: list[dict[str, Any]] = []
    n_ops = ch.integer(1, max_ops)
    literal_at = ch.integer(0, n_ops - 1) if literal else -1
    weighted = _weighted(ops)

    def recent() -> int:
        return len(shapes) - 1 - ch.integer(0, min(3, len(shapes) - 1))

    def width() -> int:
        return ch.choice((8, 4, 6, 12, 16, 2, 3, 5, 24))

    stem = width()
    steps.append({"op": "conv", "src": [0], "cin": c0, "out": stem, "k": 3, "groups": 1, "bn": ch.choice((True, False)),
                  "act": ch.choice(ACTS), "dilation": 1, "bias": True})
    shapes.append((stem, h0, w0))
    for i in range(n_ops):
        if i == literal_at:
            s = recent()
            c, h, w = shapes[s]
            out = width()
            steps.append({"op": "literal_conv", "src": [s], "cin": c, "out": out,
                          "mode": ch.choice(("view", "ones", "split"))})
            shapes.append((out, h, w))
            continue
        kind = ch.choice(weighted)
        s = recent()
        c, h, w = shapes[s]
        step: dict[str, Any] = {"op": kind, "src": [s]}
        new: list[tuple[int, int, int]]
        if kind == "conv":
            out = width()
            k = ch.choice((3, 1))
            gopts = [1] + _divisors(c, (2, 4)) * (out % 2 == 0)
            gopts = [g for g in gopts if c % g == 0 and out % g == 0]
            if out % c == 0:
                gopts.append(c)  # depthwise (with a depth multiplier when out > c)
            step.update(cin=c, out=out, k=k, groups=ch.choice(gopts), bn=ch.choice((True, False)),
                        act=ch.choice(ACTS), dilation=ch.choice((1, 2)) if k == 3 else 1, bias=ch.choice((True, False)))
            new = [(out, h, w)]
        elif kind == "residual":
            step.update(c=c, hidden=width(), inplace=ch.choice((False, True)))
            new = [(c, h, w)]
        elif kind == "binary":
            partners = [j for j, (cj, hj, wj) in enumerate(shapes) if (hj, wj) == (h, w) and cj in (c, 1)]
            j = ch.choice(partners)
            step.update(src=[s, j], fn=ch.choice(("add", "sub", "mul", "div", "max")))
            new = [(c, h, w)]
        elif kind == "cat":
            partners = [j for j, (_, hj, wj) in enumerate(shapes) if (hj, wj) == (h, w)]
            srcs = [s] + [ch.choice(partners) for _ in range(ch.integer(1, 2))]
            const = ch.choice((0, 0, 2))
            step.update(src=srcs, const=const)
            new = [(sum(shapes[j][0] for j in srcs) + const, h, w)]
        elif kind == "cat_spatial":
            partners = [j for j, (cj, hj, wj) in enumerate(shapes) if cj == c and wj == w]
            j = ch.choice(partners)
            step.update(src=[s, j])
            new = [(c, h + shapes[j][1], w)]
        elif kind == "chunk":
            n = ch.choice(_divisors(c, (2, 3, 4)) or [1])
            step.update(n=n)
            new = [(c // n, h, w)] * n
        elif kind == "split_attr":
            if c < 2:
                continue
            at = ch.integer(1, c - 1)
            step.update(at=at)
            new = [(at, h, w), (c - at, h, w)]
        elif kind == "slice_attr":
            lo = ch.integer(0, c - 1)
            hi = ch.integer(lo + 1, c)
            step.update(lo=lo, hi=hi, narrow=ch.choice((False, True)))
            new = [(hi - lo, h, w)]
        elif kind == "index_select":
            n = ch.integer(1, c)
            index = [ch.integer(0, c - 1) for _ in range(n)]
            step.update(index=index)
            new = [(n, h, w)]
        elif kind == "se":
            step.update(c=c, hidden=max(1, c // ch.choice((2, 4, 1))), conv=ch.choice((False, True)))
            new = [(c, h, w)]
        elif kind == "layer_scale":
            step.update(c=c)
            new = [(c, h, w)]
        elif kind == "shuffle":
            g = ch.choice(_divisors(c, (2, 3, 4)) or [1])
            step.update(groups=g)
            new = [(c, h, w)]
        elif kind == "pixel_shuffle":
            if c % 4 or h > 16 or w > 16:
                continue
            new = [(c // 4, 2 * h, 2 * w)]
        elif kind == "pixel_unshuffle":
            if h % 2 or w % 2 or h < 4 or w < 4 or c > 12:
                continue
            new = [(4 * c, h // 2, w // 2)]
        elif kind == "pool":
            if h < 4 or w < 4:
                continue
            step.update(fn=ch.choice(("max", "avg", "adaptive_avg", "adaptive_max")))
            new = [(c, h // 2, w // 2)]
        elif kind == "upsample":
            if h > 16 or w > 16:
                continue
            step.update(mode=ch.choice(("nearest", "bilinear")))
            new = [(c, 2 * h, 2 * w)]
        elif kind == "conv_transpose":
            if h > 16 or w > 16:
                continue
            out = width()
            g = ch.choice([1] + [g for g in (2,) if c % g == 0 and out % g == 0])
            step.update(cin=c, out=out, groups=g)
            new = [(out, 2 * h, 2 * w)]
        elif kind == "norm":
            fn = ch.choice(("bn", "instancenorm", "instancenorm_affine", "groupnorm", "layernorm_cl", "frozen_bn"))
            step.update(fn=fn, c=c, groups=ch.choice(_divisors(c, (2, 4)) or [1]))
            if fn in INEXACT_OPS:
                step["inexact"] = True
            new = [(c, h, w)]
        elif kind == "act":
            step.update(fn=ch.choice(ACTS))
            new = [(c, h, w)]
        elif kind == "dropout":
            new = [(c, h, w)]
        elif kind == "permute_linear":
            out = width()
            step.update(cin=c, out=out)
            new = [(out, h, w)]
        elif kind == "transpose_hw":
            new = [(c, w, h)]
        else:  # pragma: no cover - a typo in ``ops``
            raise ValueError(f"unknown op {kind!r}")
        steps.append(step)
        shapes.extend(new)
    heads = []
    sinks = [len(shapes) - 1] + ([recent()] if ch.choice((False, True)) else [])
    for s in sinks:
        c, h, w = shapes[s]
        options = ["conv1x1", "gap_linear", "identity"] + (["flatten_linear"] if c * h * w <= 2048 else [])
        heads.append({"src": s, "kind": ch.choice(options), "cin": c, "flat": c * h * w, "out": ch.choice((5, 3, 1))})
    return {"family": "cnn", "input": [2, c0, h0, w0], "steps": steps, "heads": heads,
            "output": ch.choice(("tensor", "tuple", "dict"))}


def generate_token_spec(ch: Chooser, max_ops: int = 6, ops: Sequence[str] = TOKEN_OPS) -> dict[str, Any]:
    """A random DAG of transformer-ish blocks over (B, T, D) tensors, after a Linear stem."""
    d0 = ch.choice((8, 12, 16))
    embed = ch.choice((False, True))
    stem = ch.choice((16, 8, 12, 24))
    dims = [d0, stem]
    steps: list[dict[str, Any]] = [{"op": "linear", "src": [0], "din": d0, "out": stem}]
    weighted = _weighted(ops)

    def recent() -> int:
        return len(dims) - 1 - ch.integer(0, min(3, len(dims) - 1))

    for _ in range(ch.integer(1, max_ops)):
        kind = ch.choice(weighted)
        s = recent()
        d = dims[s]
        step: dict[str, Any] = {"op": kind, "src": [s]}
        if kind == "linear":
            out = ch.choice((8, 16, 12, 24, 6))
            step.update(din=d, out=out)
            new = [out]
        elif kind == "mlp_residual":
            step.update(d=d, hidden=ch.choice((16, 32, 24)), act=ch.choice(("gelu", "relu", "silu")))
            new = [d]
        elif kind == "swiglu":
            step.update(d=d, hidden=ch.choice((16, 24)))
            new = [d]
        elif kind == "attention":
            heads = ch.choice([h for h in (2, 4, 1) if d % h == 0] or [1])
            kv = ch.choice([k for k in (heads, 1, 2) if heads % k == 0])
            step.update(d=d, heads=heads, kv_heads=kv, head_dim=ch.choice((4, 8)), sdpa=ch.choice((False, True)),
                        inexact=True)
            new = [d]
        elif kind == "norm":
            step.update(d=d, fn=ch.choice(("layernorm", "rmsnorm")), inexact=True)
            new = [d]
        elif kind == "act":
            step.update(fn=ch.choice(ACTS))
            new = [d]
        elif kind == "binary":
            partners = [j for j, dj in enumerate(dims) if dj in (d, 1)]
            step.update(src=[s, ch.choice(partners)], fn=ch.choice(("add", "mul", "sub")))
            new = [d]
        elif kind == "cat":
            j = recent()
            step.update(src=[s, j])
            new = [d + dims[j]]
        elif kind == "chunk":
            n = ch.choice([n for n in (2, 3) if d % n == 0] or [1])
            step.update(n=n)
            new = [d // n] * n
        elif kind == "gate":  # x * sigmoid(linear(x))
            step.update(d=d)
            new = [d]
        else:  # pragma: no cover
            raise ValueError(f"unknown op {kind!r}")
        steps.append(step)
        dims.extend(new)
    last = len(dims) - 1
    return {"family": "token", "input": [2, 5, d0], "embed": embed, "steps": steps,
            "heads": [{"src": last, "kind": ch.choice(("linear", "identity", "pool_linear")), "cin": dims[last], "out": 4}],
            "output": "tensor"}


def spec_is_exact(spec: dict[str, Any]) -> bool:
    """False if some op makes channel removal differ from zeroing (then prune with exact_only=True)."""
    return not any(step.get("inexact") for step in spec["steps"])


def describe_spec(spec: dict[str, Any]) -> str:
    parts = []
    for i, step in enumerate(spec["steps"]):
        extra = ",".join(f"{k}={v}" for k, v in step.items() if k not in ("op", "src", "inexact"))
        parts.append(f"{i}:{step['op']}({'+'.join(map(str, step['src']))}{';' + extra if extra else ''})")
    heads = ",".join(f"{h['kind']}({h['src']})" for h in spec["heads"])
    return f"{spec['family']} in={spec['input']} | " + " | ".join(parts) + f" | heads: {heads} -> {spec['output']}"


def op_kinds(spec: dict[str, Any]) -> list[str]:
    kinds = []
    for step in spec["steps"]:
        kind = step["op"]
        if "fn" in step:
            kind += f":{step['fn']}"
        kinds.append(kind)
    return kinds


# modules the random specs are built from ------------------------------------------------


class _Conv(nn.Module):
    def __init__(self, s):
        super().__init__()
        k, d = s["k"], s["dilation"]
        self.conv = nn.Conv2d(s["cin"], s["out"], k, padding=d * (k // 2), dilation=d, groups=s["groups"], bias=s["bias"])
        self.bn = nn.BatchNorm2d(s["out"]) if s["bn"] else nn.Identity()
        self.act = _act(s["act"])

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _Residual(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.body = nn.Sequential(cbr(s["c"], s["hidden"]), nn.Conv2d(s["hidden"], s["c"], 3, padding=1), nn.BatchNorm2d(s["c"]))
        self.inplace = s["inplace"]

    def forward(self, x):
        out = self.body(x)
        if self.inplace:
            out += x
            return F.relu(out, inplace=True)
        return F.relu(out + x)


class _Binary(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        if self.fn == "add":
            return a + b
        if self.fn == "sub":
            return a - b
        if self.fn == "mul":
            return a * b
        if self.fn == "div":
            return a / (b.abs() + 1.0)
        return torch.maximum(a, b)


class _Cat(nn.Module):
    def __init__(self, const: int, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.register_buffer("const", torch.randn(1, const, 1, 1) if const else None)

    def forward(self, *xs):
        if self.const is not None:
            b, _, h, w = xs[0].shape
            xs = xs + (self.const.expand(b, -1, h, w),)
        return torch.cat(xs, self.dim)


class _Chunk(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return tuple(x.chunk(self.n, 1))


class _SplitAttr(nn.Module):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def forward(self, x):
        return x[:, : self.at], x[:, self.at :]


class _SliceAttr(nn.Module):
    def __init__(self, lo, hi, narrow):
        super().__init__()
        self.lo, self.hi, self.narrow = lo, hi, narrow

    def forward(self, x):
        if self.narrow:
            return x.narrow(1, self.lo, self.hi - self.lo)
        return x[:, self.lo : self.hi]


class _IndexSelect(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))

    def forward(self, x):
        return x.index_select(1, self.index)


class _SE(nn.Module):
    def __init__(self, s):
        super().__init__()
        c, hid = s["c"], s["hidden"]
        self.conv = s["conv"]
        if self.conv:
            self.fc1, self.fc2 = nn.Conv2d(c, hid, 1), nn.Conv2d(hid, c, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(c, hid), nn.Linear(hid, c)

    def forward(self, x):
        b, c, _, _ = x.shape
        if self.conv:
            return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * w.view(b, c, 1, 1)


class _LayerScale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.gamma


class _Shuffle(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class _Pool(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        h, w = x.shape[-2:]
        if self.fn == "max":
            return F.max_pool2d(x, 2)
        if self.fn == "avg":
            return F.avg_pool2d(x, 2)
        if self.fn == "adaptive_avg":
            return F.adaptive_avg_pool2d(x, (h // 2, w // 2))
        return F.adaptive_max_pool2d(x, (h // 2, w // 2))


class _Upsample(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class _ChannelsLastLayerNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _PermuteLinear(nn.Module):
    def __init__(self, cin, out):
        super().__init__()
        self.fc = nn.Linear(cin, out)

    def forward(self, x):
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _TransposeHW(nn.Module):
    def forward(self, x):
        return x.transpose(2, 3)


class _LiteralConv(nn.Module):
    """A conv whose output is used with a channel count written as a literal in forward."""

    def __init__(self, s):
        super().__init__()
        self.conv = nn.Conv2d(s["cin"], s["out"], 3, padding=1)
        self.mode = s["mode"]
        self._literal = s["out"]  # private: not an int attribute a rewrite could pick up
        self.bn = nn.BatchNorm2d(s["out"])

    def forward(self, x):
        y = self.conv(x)
        b, _, h, w = y.shape
        n = self._literal
        if self.mode == "view":
            y = y.view(b, n, h * w).view(b, n, h, w)
        elif self.mode == "ones":
            y = y + torch.ones(1, n, 1, 1, dtype=y.dtype)
        elif n > 1:
            y = torch.cat(torch.split(y, [n // 2, n - n // 2], 1), 1)
        return self.bn(y)


class _Head(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.kind = h["kind"]
        if self.kind == "conv1x1":
            self.layer = nn.Conv2d(h["cin"], h["out"], 1)
        elif self.kind == "gap_linear":
            self.layer = nn.Linear(h["cin"], h["out"])
        elif self.kind == "flatten_linear":
            self.layer = nn.Linear(h["flat"], h["out"])
        else:
            self.layer = nn.Identity()

    def forward(self, x):
        if self.kind == "gap_linear":
            return self.layer(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.kind == "flatten_linear":
            return self.layer(torch.flatten(x, 1))
        return self.layer(x)


def _cnn_module(step: dict[str, Any]) -> nn.Module:
    kind = step["op"]
    if kind == "conv":
        return _Conv(step)
    if kind == "residual":
        return _Residual(step)
    if kind == "binary":
        return _Binary(step["fn"])
    if kind == "cat":
        return _Cat(step["const"])
    if kind == "cat_spatial":
        return _Cat(0, dim=2)
    if kind == "chunk":
        return _Chunk(step["n"])
    if kind == "split_attr":
        return _SplitAttr(step["at"])
    if kind == "slice_attr":
        return _SliceAttr(step["lo"], step["hi"], step["narrow"])
    if kind == "index_select":
        return _IndexSelect(step["index"])
    if kind == "se":
        return _SE(step)
    if kind == "layer_scale":
        return _LayerScale(step["c"])
    if kind == "shuffle":
        return _Shuffle(step["groups"])
    if kind == "pixel_shuffle":
        return nn.PixelShuffle(2)
    if kind == "pixel_unshuffle":
        return nn.PixelUnshuffle(2)
    if kind == "pool":
        return _Pool(step["fn"])
    if kind == "upsample":
        return _Upsample(step["mode"])
    if kind == "conv_transpose":
        return nn.ConvTranspose2d(step["cin"], step["out"], 2, stride=2, groups=step["groups"])
    if kind == "norm":
        fn, c = step["fn"], step["c"]
        if fn == "bn":
            return nn.BatchNorm2d(c)
        if fn == "instancenorm":
            return nn.InstanceNorm2d(c)
        if fn == "instancenorm_affine":
            return nn.InstanceNorm2d(c, affine=True)
        if fn == "groupnorm":
            return nn.GroupNorm(step["groups"], c)
        if fn == "layernorm_cl":
            return _ChannelsLastLayerNorm(c)
        from torchvision.ops.misc import FrozenBatchNorm2d

        return FrozenBatchNorm2d(c)
    if kind == "act":
        return _act(step["fn"])
    if kind == "dropout":
        return nn.Dropout(0.5)
    if kind == "permute_linear":
        return _PermuteLinear(step["cin"], step["out"])
    if kind == "transpose_hw":
        return _TransposeHW()
    if kind == "literal_conv":
        return _LiteralConv(step)
    raise ValueError(f"unknown op {kind!r}")


class _TokenAttention(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.num_heads, self.num_kv, self.head_dim = s["heads"], s["kv_heads"], s["head_dim"]
        self.sdpa = s["sdpa"]
        d = s["d"]
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(d, self.num_kv * self.head_dim)
        self.v_proj = nn.Linear(d, self.num_kv * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = repeat_kv(self.k_proj(x).view(b, t, self.num_kv, self.head_dim).transpose(1, 2), self.num_heads // self.num_kv)
        v = repeat_kv(self.v_proj(x).view(b, t, self.num_kv, self.head_dim).transpose(1, 2), self.num_heads // self.num_kv)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), -1) @ v
        return x + self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class _MLPResidual(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(s["d"], s["hidden"]), nn.Linear(s["hidden"], s["d"]), _act(s["act"])

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class _Gate(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


class _LastDimChunk(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return tuple(x.chunk(self.n, -1))


class _LastDimCat(nn.Module):
    def forward(self, *xs):
        return torch.cat(xs, -1)


class _TokenHead(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.kind = h["kind"]
        self.layer = nn.Identity() if self.kind == "identity" else nn.Linear(h["cin"], h["out"])

    def forward(self, x):
        return self.layer(x.mean(1) if self.kind == "pool_linear" else x)


def _token_module(step: dict[str, Any]) -> nn.Module:
    kind = step["op"]
    if kind == "linear":
        return nn.Linear(step["din"], step["out"])
    if kind == "mlp_residual":
        return _MLPResidual(step)
    if kind == "swiglu":
        return _SwiGLUResidual(step["d"], step["hidden"])
    if kind == "attention":
        return _TokenAttention(step)
    if kind == "norm":
        return nn.LayerNorm(step["d"]) if step["fn"] == "layernorm" else nn.RMSNorm(step["d"])
    if kind == "act":
        return _act(step["fn"])
    if kind == "binary":
        return _Binary(step["fn"])
    if kind == "cat":
        return _LastDimCat()
    if kind == "chunk":
        return _LastDimChunk(step["n"])
    if kind == "gate":
        return _Gate(step["d"])
    raise ValueError(f"unknown op {kind!r}")


class _SwiGLUResidual(SwiGLU):
    def forward(self, x):
        return x + super().forward(x)


class RandomNet(nn.Module):
    """Evaluates a spec: ``tensors = [input]``; each op reads ``src`` tensors and appends its outputs."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.family = spec["family"]
        make = _cnn_module if self.family == "cnn" else _token_module
        self.srcs = [list(step["src"]) for step in spec["steps"]]
        self.ops = nn.ModuleList(make(step) for step in spec["steps"])
        self.head_srcs = [h["src"] for h in spec["heads"]]
        self.heads = nn.ModuleList(_Head(h) if self.family == "cnn" else _TokenHead(h) for h in spec["heads"])
        self.output = spec["output"]
        self.embed = nn.Embedding(20, spec["input"][2]) if spec.get("embed") else None

    def forward(self, x):
        tensors = [self.embed(x) if self.embed is not None else x]
        for op, src in zip(self.ops, self.srcs):
            out = op(*[tensors[i] for i in src])
            if isinstance(out, tuple):
                tensors.extend(out)
            else:
                tensors.append(out)
        outs = [head(tensors[i]) for head, i in zip(self.heads, self.head_srcs)]
        if self.output == "tuple" or (self.output == "tensor" and len(outs) > 1):
            return tuple(outs)
        if self.output == "dict":
            return {f"out{i}": o for i, o in enumerate(outs)}
        return outs[0]


def build_from_spec(spec: dict[str, Any], seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The module and an example input for a spec, deterministic in ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RandomNet(spec)
        if spec["family"] == "token" and spec.get("embed"):
            b, t, _ = spec["input"]
            x = torch.randint(0, 20, (b, t))
        else:
            x = torch.randn(*spec["input"])
    return randomize_norms_(model, seed + 1), x


# ---------------------------------------------------------------------------------------
# checking helpers shared by the tests and the sweep (no torchslim import)
# ---------------------------------------------------------------------------------------


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for a tensor, a tuple of positional inputs or an ``(args, kwargs)`` pair."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    return tuple(example_inputs), {}


def assert_outputs_close(expected: list[torch.Tensor], actual: list[torch.Tensor], scale: float = 1e-5) -> None:
    """Flat outputs equal: floats to ``scale`` times their magnitude (reordered sums differ in
    the last bits), everything else exactly."""
    for a, b in zip(expected, actual, strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, atol=scale * max(1.0, a.abs().max().item()), rtol=1e-4)
        else:
            assert torch.equal(a, b)


def flat_outputs(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) output, in a stable order; None entries are skipped."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flat_outputs(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in flat_outputs(v)]
    return []


@torch.no_grad()
def run(model: nn.Module, example_inputs: Any) -> Any:
    args, kwargs = split_inputs(example_inputs)
    return model(*args, **kwargs)


def output_structure(obj: Any) -> Any:
    """The container structure and tensor shapes/dtypes of an output (for 'outputs unchanged' checks)."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return ("dict", tuple((k, output_structure(v)) for k, v in obj.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(output_structure(v) for v in obj))
    return ("other", repr(obj))


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under every name it has (tied weights appear once per name)."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for attr, t in store.items():
                if t is not None:
                    out[f"{mod_name}.{attr}" if mod_name else attr] = t
    return out


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, complex, torch.dtype, torch.device)) or (
        isinstance(value, (tuple, list, frozenset, set)) and all(_plain(v) for v in value)) or (
        isinstance(value, dict) and all(_plain(k) and _plain(v) for k, v in value.items()))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an all-or-nothing failure must leave as it was: tensors (object and value),
    module types, public attributes, hook counts and the module tree."""
    tensors = {}
    for name, t in named_tensors(model).items():
        tensors[name] = (t, t.detach().clone(), type(t), t.requires_grad)
    modules = {}
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = {}
        for k, v in vars(m).items():
            if k.startswith("_") or isinstance(v, torch.Tensor):
                continue
            attrs[k] = ("value", copy.deepcopy(v)) if _plain(v) else ("object", v)
        hooks = tuple(len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                    "_state_dict_hooks", "_load_state_dict_pre_hooks"))
        children = tuple((n, id(c)) for n, c in m._modules.items())
        modules[name] = (type(m), id(m), attrs, hooks, children, tuple(m._parameters), tuple(m._buffers))
    return {"tensors": tensors, "modules": modules}


def snapshot_diff(before: dict[str, Any], model: nn.Module) -> list[str]:
    """Differences between a snapshot and the model now (empty = exactly as before)."""
    after = snapshot(model)
    problems = []
    if set(before["tensors"]) != set(after["tensors"]):
        problems.append(f"tensor names changed: {sorted(set(before['tensors']) ^ set(after['tensors']))}")
    for name, (obj, value, typ, grad) in before["tensors"].items():
        if name not in after["tensors"]:
            continue
        now = after["tensors"][name][0]
        if now is not obj:
            problems.append(f"{name}: a different tensor object")
        if type(now) is not typ or now.requires_grad != grad:
            problems.append(f"{name}: type/requires_grad changed")
        if now.shape != value.shape or now.dtype != value.dtype:
            problems.append(f"{name}: shape {tuple(value.shape)} -> {tuple(now.shape)}")
        elif not torch.equal(now.detach(), value):
            problems.append(f"{name}: values changed")
    if set(before["modules"]) != set(after["modules"]):
        problems.append(f"module names changed: {sorted(set(before['modules']) ^ set(after['modules']))}")
    for name, (typ, ident, attrs, hooks, children, pnames, bnames) in before["modules"].items():
        if name not in after["modules"]:
            continue
        typ2, ident2, attrs2, hooks2, children2, pnames2, bnames2 = after["modules"][name]
        if (typ, ident, children, pnames, bnames) != (typ2, ident2, children2, pnames2, bnames2):
            problems.append(f"module '{name}': type, identity, children or tensor slots changed")
        if hooks != hooks2:
            problems.append(f"module '{name}': hooks {hooks} -> {hooks2}")
        if set(attrs) != set(attrs2):
            problems.append(f"module '{name}': attributes {sorted(set(attrs) ^ set(attrs2))} added/removed")
        for k, (kind, v) in attrs.items():
            if k not in attrs2:
                continue
            kind2, v2 = attrs2[k]
            same = (v2 is v) if kind == "object" else (kind2 == "value" and type(v2) is type(v) and v2 == v)
            if not same:
                problems.append(f"module '{name}': attribute {k} {v!r} -> {v2!r}")
    return problems


def plan_problems(removed: dict[str, dict[int, list[int]]], original: nn.Module, pruned: nn.Module) -> list[str]:
    """Check a plan's ``removed`` map against the original and the pruned model.

    * every name is a parameter or buffer of the original, every dim exists, indices are
      ints, unique, in range, and never the whole dimension;
    * every tensor of the pruned model (under every alias) equals the original's tensor with
      exactly those indices removed: survivors are bit-identical (weights and BN statistics
      kept), untouched tensors are unchanged, and nothing else moved.
    """
    problems = []
    orig = named_tensors(original)
    new = named_tensors(pruned)
    if not isinstance(removed, dict):
        return [f"plan.removed is a {type(removed).__name__}, not a dict"]
    for name, dims in removed.items():
        if name not in orig:
            problems.append(f"plan names '{name}', which the original does not have")
            continue
        if not isinstance(dims, dict):
            problems.append(f"plan.removed['{name}'] is not a dict of dim -> indices")
            continue
        for dim, idx in dims.items():
            t = orig[name]
            if not isinstance(dim, int) or not 0 <= dim < t.ndim:
                problems.append(f"{name}: dim {dim!r} out of range for shape {tuple(t.shape)}")
                continue
            idx = list(idx)
            if not all(isinstance(i, int) for i in idx):
                problems.append(f"{name}[{dim}]: indices are not ints")
                continue
            if len(set(idx)) != len(idx) or not all(0 <= i < t.shape[dim] for i in idx):
                problems.append(f"{name}[{dim}]: indices not unique and in range: {idx}")
            if len(set(idx)) >= t.shape[dim]:
                problems.append(f"{name}[{dim}]: removes the whole dimension")
    if set(orig) != set(new):
        problems.append(f"state names changed: {sorted(set(orig) ^ set(new))}")
    # the removal of a tensor is the plan entry of any of its aliases (tied weights)
    aliases: dict[int, list[str]] = {}
    for name, t in orig.items():
        aliases.setdefault(id(t), []).append(name)
    for name, t in orig.items():
        if name not in new:
            continue
        entries = [removed[a] for a in aliases[id(t)] if a in removed]
        dims = entries[0] if entries else {}
        if any(e != dims for e in entries[1:]):
            problems.append(f"{name}: aliases have different removals")
        expected = t.detach()
        try:
            for dim, idx in dims.items():
                keep = [i for i in range(expected.shape[dim]) if i not in set(idx)]
                expected = expected.index_select(dim, torch.tensor(keep, dtype=torch.long))
        except Exception as exc:  # noqa: BLE001 - reported above as a malformed plan
            problems.append(f"{name}: cannot apply the plan ({exc})")
            continue
        got = new[name].detach()
        if got.shape != expected.shape:
            problems.append(f"{name}: shape {tuple(got.shape)}, plan implies {tuple(expected.shape)}")
        elif got.dtype != expected.dtype or not torch.equal(got, expected):
            problems.append(f"{name}: surviving values differ from the original's")
    return problems


def attribute_problems(model: nn.Module) -> list[str]:
    """Standard modules whose size attributes disagree with their tensors (after surgery they
    must be updated, or repr, re-instantiation from config and export go wrong)."""
    problems = []
    frozen = _frozen_bn_type()
    for name, m in model.named_modules():
        where = name or "<root>"
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            if m.transposed:
                ok = m.in_channels == w.shape[0] and m.out_channels == w.shape[1] * m.groups
            else:
                ok = m.out_channels == w.shape[0] and m.in_channels == w.shape[1] * m.groups
            ok = ok and m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0
            if m.bias is not None:
                ok = ok and m.bias.shape[0] == m.out_channels
            if not ok:
                problems.append(f"{where}: {type(m).__name__}(in={m.in_channels}, out={m.out_channels}, "
                                f"groups={m.groups}) but weight {tuple(w.shape)}")
        elif isinstance(m, nn.Linear):
            if (m.out_features, m.in_features) != tuple(m.weight.shape):
                problems.append(f"{where}: Linear({m.in_features}, {m.out_features}) but weight {tuple(m.weight.shape)}")
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            sizes = {t.shape[0] for t in (m.weight, m.running_mean) if t is not None}
            if sizes and sizes != {m.num_features}:
                problems.append(f"{where}: num_features={m.num_features} but tensors of size {sorted(sizes)}")
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None and tuple(m.normalized_shape) != tuple(m.weight.shape):
                problems.append(f"{where}: normalized_shape={tuple(m.normalized_shape)} but weight {tuple(m.weight.shape)}")
        elif isinstance(m, nn.GroupNorm):
            if m.weight is not None and m.num_channels != m.weight.shape[0]:
                problems.append(f"{where}: num_channels={m.num_channels} but weight {tuple(m.weight.shape)}")
            if m.num_channels % m.num_groups:
                problems.append(f"{where}: {m.num_channels} channels in {m.num_groups} groups")
        elif isinstance(m, nn.Embedding):
            if (m.num_embeddings, m.embedding_dim) != tuple(m.weight.shape):
                problems.append(f"{where}: Embedding({m.num_embeddings}, {m.embedding_dim}) but weight {tuple(m.weight.shape)}")
        elif isinstance(m, nn.MultiheadAttention):
            e = m.embed_dim
            if m.in_proj_weight is not None and m.in_proj_weight.shape[0] != 3 * e:
                problems.append(f"{where}: embed_dim={e} but in_proj_weight {tuple(m.in_proj_weight.shape)}")
            if m.head_dim * m.num_heads != e:
                problems.append(f"{where}: head_dim * num_heads != embed_dim ({m.head_dim}*{m.num_heads} != {e})")
        elif frozen is not None and isinstance(m, frozen):
            pass  # FrozenBatchNorm2d keeps no size attribute
    return problems


class Expert(nn.Module):
    """One expert of :class:`ModuleListMoE`: a two-layer MLP."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


# tiny Hugging Face MoE configs (fused experts) for the MoE tests: kind -> AutoConfig.for_model kwargs
MOE_CONFIGS: dict[str, dict[str, int]] = {
    "mixtral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, vocab_size=100),
    "qwen2_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                      num_experts=4, num_experts_per_tok=2, vocab_size=100),
}


def tiny_moe_config(kind: str, **extra: Any) -> Any:
    """A ``transformers`` config of ``kind`` ("mixtral" or "qwen2_moe") from ``MOE_CONFIGS``."""
    import transformers

    return transformers.AutoConfig.for_model(kind, **MOE_CONFIGS[kind], **extra)


def tiny_moe_causal_lm(config: Any, implementation: str = "grouped_mm") -> nn.Module:
    """The causal LM of ``config`` with seed-0 weights and the given experts implementation, in eval mode."""
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, experts_implementation=implementation).eval()


@torch.no_grad()
def zero_expert_units_(model: nn.Module, units: Sequence[int]) -> None:
    """Zero ``units`` (hidden units of every fused expert, gate and up halves and down column) in
    every layer of a tiny MoE causal LM: they contribute nothing."""
    for layer in model.model.layers:
        experts = layer.mlp.experts
        inner = experts.down_proj.shape[2]
        for unit in units:
            experts.gate_up_proj[:, [unit, inner + unit], :] = 0
            experts.down_proj[:, :, unit] = 0


class ModuleListMoE(nn.Module):
    """Top-1 routing over per-expert modules in an nn.ModuleList behind a linear router, as user
    code and older transformers write it; ``head`` adds a linear layer of that many outputs."""

    def __init__(self, width: int = 16, hidden: int = 32, n_experts: int = 4, head: int | None = None):
        super().__init__()
        self.router = nn.Linear(width, n_experts)
        self.experts = nn.ModuleList(Expert(width, hidden) for _ in range(n_experts))
        self.head = nn.Linear(width, head) if head is not None else nn.Identity()

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero().squeeze(-1)
            out = out.index_add(0, rows, expert(x[rows]))
        return self.head(out)
