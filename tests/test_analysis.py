"""torchslim.analyze: MACs against torch's FLOP counter and hand formulas, rows, roll-ups,
top-k, JSON, state restoration and latency. Every expected figure is computed here,
independently of torchslim's counter (torch's FlopCounterMode, or shapes and arithmetic)."""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import torchslim
from torchslim._timing import fixed_threads, measure_latency, module_latency
from torchslim.analysis import AnalysisReport, profile_macs

torchvision = pytest.importorskip("torchvision")


# ----------------------------------------------------------------------------- references


def torch_reference_macs(model, args=(), kwargs=None) -> int:
    """torch's own FLOP counter / 2, with attention decomposed into the matmuls it counts
    (MATH SDPA backend, MHA fast path off): an independent reference for our totals."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(*args, **(kwargs or {}))
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    return counter.get_total_flops() // 2


def weight_layer_macs(model, args=(), kwargs=None) -> dict[str, int]:
    """Hand formulas from the shapes hooks see: conv = out elements x Cin/groups x kernel
    area, linear = out elements x in_features. Keyed by qualified name."""
    result: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            def hook(m, i, o, name=name):
                result[name] = result.get(name, 0) + o.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(module, nn.Linear):
            def hook(m, i, o, name=name):
                result[name] = result.get(name, 0) + o.numel() * m.in_features
        else:
            continue
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return result


def input_numel_of(model, module_name, args=(), kwargs=None) -> int:
    """Elements entering one module (for global average pooling, which we count as C*H*W)."""
    seen = []
    handle = dict(model.named_modules())[module_name].register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    with torch.no_grad():
        model(*args, **(kwargs or {}))
    handle.remove()
    return sum(seen)


# ----------------------------------------------------------------------------- architectures


class MultiInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.meta = nn.Linear(5, 8)
        self.head = nn.Linear(8 * 7 * 7 + 8, 4)

    def forward(self, img, vec):
        return self.head(torch.cat([self.image(img).flatten(1), self.meta(vec)], 1))


class KeywordInput(nn.Module):
    """``model(img, inference=True)``, like MODNet: the training-only head is skipped."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 16, 3, padding=1)
        self.aux = nn.Conv2d(16, 4, 1)
        self.out = nn.Conv2d(16, 1, 1)

    def forward(self, img, inference: bool = False):
        y = torch.relu(self.body(img))
        return self.out(y), (None if inference else self.aux(y))


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 6), nn.Linear(12, 3)

    def forward(self, x):
        return self.a(x), (self.b(x), None)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Conv2d(3, 6, 3)
        self.cls = nn.Linear(6, 2)

    def forward(self, x):
        f = self.trunk(x)
        return {"features": f, "logits": self.cls(f.mean((2, 3))), "extra": None}


@dataclasses.dataclass
class Prediction:
    boxes: torch.Tensor
    scores: torch.Tensor
    note: str = "dataclass"


class DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 8)
        self.score = nn.Linear(8, 1)

    def forward(self, x):
        h = self.fc(x)
        return Prediction(boxes=h.view(-1, 2, 4), scores=self.score(h))


class MatmulZoo(nn.Module):
    """matmul, bmm, einsum and SDPA in one forward (plus the projections feeding them)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, x):  # x: (B, L, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k)            # einsum
        mixed = torch.matmul(scores.softmax(-1), v)                # matmul (batched)
        fused = F.scaled_dot_product_attention(q, k, v)           # SDPA
        gram = torch.bmm(x, x.transpose(1, 2))                    # bmm
        return mixed + fused, gram


def _matmul_zoo_expected(b=2, n=6, dim=16, heads=2) -> int:
    hd = dim // heads
    qkv = b * n * dim * 3 * dim
    einsum = b * heads * n * n * hd
    matmul = b * heads * n * n * hd
    sdpa = b * heads * n * n * (hd + hd)
    bmm = b * n * n * dim
    return qkv + einsum + matmul + sdpa + bmm


def _tv(name, **kw):
    return lambda: getattr(torchvision.models, name)(**kw)


def _tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64)


ARCHS = {
    # name: (builder, (args, kwargs), global-average-pool module whose input counts as MACs)
    "resnet18": (_tv("resnet18"), ((torch.randn(1, 3, 64, 64),), {}), "avgpool"),
    "mobilenet_v2": (_tv("mobilenet_v2"), ((torch.randn(1, 3, 64, 64),), {}), "features"),
    "tiny_vit": (_tiny_vit, ((torch.randn(2, 3, 32, 32),), {}), None),
    "transformer_encoder": (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2),
                            ((torch.randn(2, 10, 32),), {}), None),
    "multi_input": (MultiInput, ((torch.randn(2, 3, 16, 16), torch.randn(2, 5)), {}), None),
    "keyword_input": (KeywordInput, ((torch.randn(1, 3, 12, 12),), {"inference": True}), None),
    "tuple_output": (TupleOut, ((torch.randn(4, 12),), {}), None),
    "dict_output": (DictOut, ((torch.randn(1, 3, 10, 10),), {}), "trunk"),
    "dataclass_output": (DataclassOut, ((torch.randn(3, 10),), {}), None),
    "matmul_einsum_sdpa": (MatmulZoo, ((torch.randn(2, 6, 16),), {}), None),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_totals_match_torch_flop_counter_and_hand_formulas(arch):
    builder, (args, kwargs), pooled = ARCHS[arch]
    torch.manual_seed(0)
    model = builder().eval()
    report = torchslim.analyze(model, (args, kwargs), latency=False)

    # Totals: torch's counter, plus the global average pool torch does not count (C*H*W of its input).
    expected = torch_reference_macs(model, args, kwargs)
    if pooled == "features":  # mobilenet_v2 pools functionally after `features`: its output is the input
        expected += sum(math.prod(s) for s in report.layer("features").output_shape)
    elif pooled == "trunk":  # DictOut averages the trunk's output with .mean((2, 3))
        expected += sum(math.prod(s) for s in report.layer("trunk").output_shape)
    elif pooled:
        expected += input_numel_of(model, pooled, args, kwargs)
    assert report.total_macs == expected
    if arch != "dict_output":  # (its pooling is 4% of a 10 k-MAC toy; on real models pooling is noise)
        assert abs(report.total_macs - torch_reference_macs(model, args, kwargs)) <= 0.01 * report.total_macs

    # Every conv / linear leaf equals its hand formula; the root row holds the total.
    for name, macs in weight_layer_macs(model, args, kwargs).items():
        assert report.layer(name).macs == macs, name
    assert report.layer("").macs == report.total_macs
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert [r.name for r in report.layers] == [n for n, _ in model.named_modules()]


def test_keyword_input_changes_what_runs():
    model = KeywordInput().eval()
    img = torch.randn(1, 3, 12, 12)
    with_aux = torchslim.analyze(model, ((img,), {"inference": False}), latency=False)
    without = torchslim.analyze(model, ((img,), {"inference": True}), latency=False)
    assert with_aux.total_macs - without.total_macs == 16 * 4 * 144
    assert without.layer("aux").calls == 0 and without.layer("aux").macs == 0 and without.layer("aux").output_shape == []
    assert with_aux.layer("aux").output_shape == [[1, 4, 12, 12]]


def test_matmul_einsum_sdpa_formulas():
    model = MatmulZoo().eval()
    report = torchslim.analyze(model, torch.randn(2, 6, 16), latency=False)
    assert report.total_macs == _matmul_zoo_expected()
    assert report.macs_by_op["aten._scaled_dot_product_flash_attention_for_cpu"] == 2 * 2 * 6 * 6 * 16


def test_input_forms_tensor_tuple_and_args_kwargs_agree():
    model = MultiInput().eval()
    img, vec = torch.randn(2, 3, 16, 16), torch.randn(2, 5)
    a = torchslim.analyze(model, (img, vec), latency=False)
    b = torchslim.analyze(model, ((img,), {"vec": vec}), latency=False)
    c = torchslim.analyze(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), latency=False)
    assert a.total_macs == b.total_macs and a.input_shapes == [[2, 3, 16, 16], [2, 5]] == b.input_shapes
    assert c.total_macs == 4 * 6 * 6 * 3 * 9 and c.layers[0].output_shape == [[1, 4, 6, 6]]
    with pytest.raises(TypeError):
        torchslim.analyze(model, "not an input", latency=False)


class NoneOut(nn.Module):
    """Returns nothing: writes its result into a buffer (analysis must restore the buffer)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("last", torch.zeros(2, 4))

    def forward(self, x):
        self.last.copy_(self.fc(x))


def test_none_output_and_buffers_written_by_forward_are_restored():
    model = NoneOut().eval()
    report = torchslim.analyze(model, torch.randn(2, 4), warmup=0, repeats=1)
    assert report.total_macs == 2 * 4 * 4 and report.layers[0].output_shape == []
    assert report.layer("fc").output_shape == [[2, 4]]
    assert torch.equal(model.last, torch.zeros(2, 4))


# ----------------------------------------------------------------------------- functional ops


class Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("fn,shape,expected", [
    # interpolation: taps per output element (N*C*H*W of the output)
    (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), (1, 3, 5, 7), 4 * 3 * 10 * 14),
    (lambda x: F.interpolate(x, size=(4, 4), mode="bicubic"), (2, 2, 8, 8), 16 * 2 * 2 * 16),
    (lambda x: F.interpolate(x, scale_factor=3, mode="nearest"), (1, 3, 5, 5), 0),
    (lambda x: F.interpolate(x, scale_factor=2, mode="linear"), (1, 3, 9), 2 * 3 * 18),
    (lambda x: F.interpolate(x, scale_factor=2, mode="trilinear"), (1, 2, 2, 3, 4), 8 * 2 * 4 * 6 * 8),
    # pooling: one add per element read
    (lambda x: F.avg_pool2d(x, 3, stride=1, padding=1), (1, 2, 5, 5), 9 * 2 * 25),
    (lambda x: F.avg_pool2d(x, 2), (1, 4, 6, 6), 4 * 4 * 9),
    (lambda x: F.avg_pool1d(x, 3, stride=2), (1, 2, 9), 3 * 2 * 4),
    (lambda x: F.adaptive_avg_pool2d(x, 1), (2, 8, 6, 6), 2 * 8 * 36),
    # 5 -> 2 windows are [0, 3) and [2, 5): 3 + 3 reads per dimension
    (lambda x: F.adaptive_avg_pool2d(x, 2), (1, 2, 5, 5), 2 * 6 * 6),
    (lambda x: F.max_pool2d(x, 2), (1, 4, 6, 6), 0),
    (lambda x: x.mean(-1), (3, 10), 30),
    # matrix-vector and grid sampling
    (lambda x: x @ torch.ones(7), (5, 7), 35),
    (lambda x: F.grid_sample(x, torch.zeros(1, 3, 4, 2), align_corners=False), (1, 2, 6, 6), 4 * 2 * 3 * 4),
    # elementwise, norms, softmax: 0
    (lambda x: torch.softmax(x * 2 + 1, -1), (4, 9), 0),
    (lambda x: F.layer_norm(x, (9,)), (4, 9), 0),
])
def test_functional_op_conventions(fn, shape, expected):
    report = torchslim.analyze(Functional(fn), torch.randn(shape), latency=False)
    assert report.total_macs == expected


def test_conv_linear_and_sdpa_against_torch_formulas():
    # grouped / strided / dilated conv, transposed conv, linear on 3-D input
    model = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, groups=4, dilation=2), nn.ConvTranspose2d(16, 4, 2, stride=2),
                          nn.Flatten(2), nn.Linear(36, 5))
    x = torch.randn(2, 8, 10, 10)
    report = torchslim.analyze(model, x, latency=False)
    assert report.total_macs == torch_reference_macs(model, (x,))
    assert report.layer("0").macs == 2 * 16 * 3 * 3 * (8 // 4) * 9


# ----------------------------------------------------------------------------- structure


class Branchy(nn.Module):
    """Containers at two depths, functional ops in a container's own forward, and a shared module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.ModuleDict({"a": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                                     "b": nn.Conv2d(8, 8, 1)})
        self.head = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(1))  # owned by the root itself

    def forward(self, x):
        x = self.stem(x)
        y = self.branch["a"](F.interpolate(x, scale_factor=0.5, mode="bilinear"))  # the root's own op
        y = self.branch["b"](y)
        return self.head(y.mean((2, 3))) * self.scale


def test_rows_params_macs_and_rollups_partition_the_model():
    model = Branchy().eval()
    x = torch.randn(1, 3, 16, 16)
    report = torchslim.analyze(model, x, latency=False)
    conv_a, conv_b = 8 * 8 * 9 * 64, 8 * 8 * 64
    interp, pool = 4 * 8 * 64, 8 * 64
    assert report.layer("branch").macs == conv_a + conv_b
    assert report.layer("branch").params == sum(p.numel() for p in model.branch.parameters())
    assert report.layer("").self_macs == interp + pool and report.layer("").self_params == 1
    assert report.layer("branch.a.0").activation_bytes == 8 * 8 * 8 * 4
    assert not report.layer("branch").is_leaf and report.layer("branch.a.1").is_leaf

    for depth in (1, 2, 3):
        rows = report.rollup(depth)
        assert sum(r.macs for r in rows) == report.total_macs
        assert sum(r.params for r in rows) == report.total_params
        assert [r.macs for r in rows] == sorted((r.macs for r in rows), reverse=True)
    depth1 = {r.label: r for r in report.rollup(1)}
    assert set(depth1) == {"stem", "branch", "head", "(model) (own ops)"}
    assert depth1["(model) (own ops)"].macs == interp + pool
    depth2 = {r.label: r.macs for r in report.rollup(2)}
    assert depth2["branch.a"] == conv_a and depth2["branch.b"] == conv_b and depth2["stem"] == 8 * 27 * 256
    by_params = report.rollup(1, key="params")
    assert [r.params for r in by_params] == sorted((r.params for r in by_params), reverse=True)
    with pytest.raises(ValueError):
        report.rollup(0)


def test_top_k_by_macs_and_by_other_keys():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    report = torchslim.analyze(model, x, latency=False)
    hand = weight_layer_macs(model, (x,))
    expected = sorted(hand.values(), reverse=True)[:5]
    assert [r.macs for r in report.top(5)] == expected
    assert all(r.is_leaf for r in report.top(50))
    params = sorted(((m.weight.numel() + (m.bias.numel() if m.bias is not None else 0))
                     for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))), reverse=True)
    assert [r.params for r in report.top(3, key="params")] == params[:3]
    with pytest.raises(ValueError):
        report.top(3, key="nope")


def test_shared_module_counted_once_and_flop_counter_by_call_view():
    from torchslim.models.modnet import MODNet

    model = MODNet().eval()
    inputs = ((torch.randn(1, 3, 64, 64),), {"inference": False})
    report = torchslim.analyze(model, inputs, latency=False)
    assert model.lr_branch.backbone is model.backbone
    names = [r.name for r in report.layers]
    assert "backbone" in names and not any(n.startswith("lr_branch.backbone") for n in names)
    # torch's per-module table counts by call nesting: lr_branch calls the backbone
    profile, _ = profile_macs(model, inputs)
    assert profile.by_call["lr_branch"] == report.layer("lr_branch").macs + report.layer("backbone").macs
    assert profile.by_call["hr_branch"] == report.layer("hr_branch").macs
    assert profile.total == report.total_macs
    # state_dict lists the backbone twice; bytes count each tensor once, torch.save as saved
    state = model.state_dict()
    assert any(k.startswith("lr_branch.backbone.") for k in state)
    unique = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert report.state_dict_bytes == unique
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert report.disk_bytes == buffer.tell()


def test_json_round_trip():
    model = Branchy().eval()
    report = torchslim.analyze(model, torch.randn(1, 3, 16, 16), warmup=0, repeats=2)
    text = report.to_json()
    data = json.loads(text)
    assert data["total_macs"] == report.total_macs and len(data["layers"]) == len(report.layers)
    assert AnalysisReport.from_json(text) == report
    assert AnalysisReport.from_dict(report.to_dict()) == report


# ----------------------------------------------------------------------------- state and grad mode


def test_state_restored_frozen_training_model_under_no_grad():
    model = torchvision.models.resnet18()
    model.train()
    model.layer1.eval()  # mixed flags must come back as they were
    for p in model.layer2.parameters():
        p.requires_grad_(False)
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    before = copy.deepcopy(model.state_dict())
    threads = torch.get_num_threads()
    with torch.no_grad():
        report = torchslim.analyze(model, torch.randn(2, 3, 32, 32), warmup=0, repeats=1, threads=1)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched (eval inside)
    assert torch.get_num_threads() == threads and report.threads == 1
    assert report.training is True


def test_grad_mode_and_fastpath_restored_and_no_graph_built():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1).eval()
    x = torch.randn(1, 5, 16, requires_grad=True)
    with torch.enable_grad():
        torchslim.analyze(model, x, latency=False)
        assert torch.is_grad_enabled()
    assert torch.backends.mha.get_fastpath_enabled()
    assert x.grad is None and all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- latency


class Sleepy(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_latency_rows_shares_and_self_time():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(Sleepy(0.004), nn.ReLU())).eval()
    report = torchslim.analyze(model, torch.randn(2, 8), warmup=1, repeats=3)
    assert report.latency_ms >= 4.0 and report.latency_p10_ms <= report.latency_ms <= report.latency_p90_ms
    assert report.latency_runs == 3 and report.threads == 1
    sleepy, container = report.layer("1.0"), report.layer("1")
    assert sleepy.latency_ms >= 4.0 and container.latency_ms >= sleepy.latency_ms
    assert container.self_latency_ms < sleepy.latency_ms  # the child's sleep is not the container's own time
    for row in report.layers[1:]:
        assert row.latency_share == pytest.approx(row.latency_ms / report.latency_ms)
        assert row.self_latency_ms <= row.latency_ms + 1e-9
    assert report.layers[0].latency_share == 1.0
    rollup = {r.name: r for r in report.rollup(1)}
    assert rollup["1"].latency_ms >= 4.0 and rollup["1"].latency_share > 0
    no_latency = torchslim.analyze(model, torch.randn(2, 8), latency=False)
    assert no_latency.latency_ms is None and all(r.latency_ms is None for r in no_latency.layers)


def test_measure_latency_counts_runs_and_pins_threads():
    calls, seen_threads = [], []

    def fn():
        calls.append(1)
        seen_threads.append(torch.get_num_threads())

    before = torch.get_num_threads()
    stats = measure_latency(fn, warmup=2, repeats=5, threads=1)
    assert len(calls) == 7 and set(seen_threads) == {1} and torch.get_num_threads() == before
    assert stats.runs == 5 and stats.threads == 1 and stats.p10_ms <= stats.median_ms <= stats.p90_ms
    with pytest.raises(ValueError):
        measure_latency(fn, repeats=0)
    with pytest.raises(ValueError):
        with fixed_threads(0):
            pass


def test_module_latency_medians_per_module():
    model = nn.Sequential(Sleepy(0.01), nn.Identity())  # Identity, not sleep(0): that yields the core on a busy machine
    timing = module_latency(model, lambda: model(torch.zeros(1)), warmup=0, repeats=3)
    assert set(timing) == {"", "0", "1"}
    assert timing["0"].median_ms >= 10.0 and timing["1"].median_ms < timing["0"].median_ms
    assert timing[""].median_ms >= timing["0"].median_ms and timing[""].self_median_ms < timing["0"].median_ms
    assert timing["0"].calls == 1


# ----------------------------------------------------------------------------- a busy machine, simulated


class BusyClock:
    """A fake clock for ``torchslim._timing``: only :class:`Costly` modules advance it, by their
    cost, 100x slower during a burst of other work that starts with the first timed run and
    lasts ``burst`` module calls."""

    def __init__(self, burst: int):
        self.now, self.burst, self.calls, self.started = 0.0, burst, 0, None

    def perf_counter(self) -> float:
        if self.started is None:
            self.started = self.calls
        return self.now

    def spend(self, ms: float) -> None:
        self.calls += 1
        busy = self.started is not None and self.calls - self.started <= self.burst
        self.now += ms / 1000 * (100 if busy else 1)


class Costly(nn.Module):
    def __init__(self, clock: BusyClock, ms: float):
        super().__init__()
        self.clock, self.ms = clock, ms

    def forward(self, x):
        self.clock.spend(self.ms)
        return x


def test_analyze_keeps_the_least_disturbed_round_with_its_module_times(monkeypatch):
    """A burst of other work during the timing used to become the model's latency (244 ms for
    a 2 ms model); now it spoils one round of three, the best round is reported with the
    module times measured next to it, and the disagreeing rounds are warned about."""
    from torchslim.latency import LatencyNoiseWarning

    clock = BusyClock(burst=2 * (3 + 5 + 5))  # round 1: 3 warm-up, 5 timed and 5 hooked runs of 2 modules
    monkeypatch.setattr("torchslim._timing.time", clock)
    model = nn.Sequential(Costly(clock, 2.0), nn.Sequential(Costly(clock, 1.0)))
    with pytest.warns(LatencyNoiseWarning, match="varied 100.0x across 3 rounds"):
        report = torchslim.analyze(model, torch.zeros(1))
    assert report.latency_ms == pytest.approx(3.0)
    assert report.latency_rounds_ms == pytest.approx([300.0, 3.0, 3.0])
    assert report.layer("0").latency_ms == pytest.approx(2.0) and report.layer("0").latency_share == pytest.approx(2 / 3)
    assert "best of 3 rounds of 5 runs" in report.summary()


def test_measure_in_turn_records_rounds_and_warns_when_they_disagree(monkeypatch):
    from torchslim.latency import LatencyNoiseWarning, measure_in_turn

    clock = BusyClock(burst=1 + 5)  # the first round of 'slow': one warm-up and five timed runs
    monkeypatch.setattr("torchslim._timing.time", clock)
    models = {"slow": Costly(clock, 4.0), "fast": Costly(clock, 1.0)}
    with pytest.warns(LatencyNoiseWarning, match="'slow' varied 100.0x") as caught:
        stats = measure_in_turn(models, torch.zeros(1), rounds=3, warmup=1, repeats=5)
    assert len(caught) == 1  # 'fast' was timed after the burst: its rounds agree
    assert stats["slow"].median_ms == pytest.approx(4.0) and stats["fast"].median_ms == pytest.approx(1.0)
    assert stats["slow"].round_medians_ms == pytest.approx([400.0, 4.0, 4.0])
    assert stats["fast"].round_medians_ms == pytest.approx([1.0, 1.0, 1.0])


def test_noise_warning_names_threads_competing_for_every_core(monkeypatch):
    from torchslim._timing import LatencyNoiseWarning, LatencyStats, warn_if_rounds_disagree

    monkeypatch.setattr("torchslim._timing.os.cpu_count", lambda: 2)
    noisy = LatencyStats(1.0, 0.9, 300.0, 5, threads=2, round_medians_ms=[244.0, 262.0, 4.2])
    with pytest.warns(LatencyNoiseWarning, match="2 threads on 2 cores.*time with 1 thread"):
        assert "varied 62.4x" in warn_if_rounds_disagree("the model", noisy)
    quiet = LatencyStats(1.0, 0.9, 1.1, 5, threads=1, round_medians_ms=[1.0, 1.2, 1.1])
    assert warn_if_rounds_disagree("the model", quiet) is None


def test_analyze_times_on_one_thread_unless_told():
    """With as many threads as cores, any other busy process stalls every parallel op (a 0.3 ms
    CNN measured 80 ms at 2 threads on 2 busy cores): one thread is the default, as for every
    latency torchslim measures; threads=None keeps torch's count."""
    model = nn.Sequential(nn.Linear(8, 8))
    with fixed_threads(2):
        assert torchslim.analyze(model, torch.randn(2, 8), repeats=1, rounds=1).threads == 1
        assert torchslim.analyze(model, torch.randn(2, 8), repeats=1, rounds=1, threads=None).threads == 2
        assert torch.get_num_threads() == 2
