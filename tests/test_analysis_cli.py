"""Analysis totals against torch's FLOP counter, report structure, CLI errors and the demo."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import torchslim
from torchslim.cli import main


def _torch_macs(model, *args, **kwargs) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops() / 2


class KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU())

    def forward(self, img, inference: bool = True):
        y = self.b(self.a(img))
        return {"y": y, "aux": None if inference else y.mean()}


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(1, 10, 32))


@pytest.mark.parametrize("build", [
    lambda: (__import__("torchvision").models.resnet18(), (torch.randn(1, 3, 64, 64),)),
    lambda: (__import__("torchvision").models.mobilenet_v2(), (torch.randn(1, 3, 64, 64),)),
    lambda: (nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)), (torch.randn(5, 16),)),
    lambda: (Attn(), (torch.randn(1, 10, 32),)),
    lambda: (KwModel(), (torch.randn(1, 3, 16, 16),)),
])
def test_total_macs_match_torch_flop_counter(build):
    model, args = build()
    model.eval()
    report = torchslim.analyze(model, args, latency=False)
    expected = _torch_macs(model, *args)
    assert abs(report.total_macs - expected) <= 0.01 * expected
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_report_rows_rollup_json_and_state_restored():
    model = KwModel().train()
    for p in model.a.parameters():
        p.requires_grad_(False)
    report = torchslim.analyze(model, ((torch.randn(1, 3, 16, 16),), {"inference": False}), repeats=3)
    assert model.training and not model.a.weight.requires_grad
    conv_a = report.layer("a")
    assert conv_a.macs == 8 * 14 * 14 * 3 * 9 and conv_a.output_shape == [[1, 8, 14, 14]]
    assert conv_a.activation_bytes == 8 * 14 * 14 * 4
    assert report.layer("b").macs == report.layer("b.0").macs == 8 * 12 * 12 * 8 * 9
    assert [r.name for r in report.rollup(1) if not r.own] == ["b", "a"]  # plus the root's own y.mean()
    assert report.top(1)[0].name == "b.0"
    assert report.latency_ms > 0 and report.layer("b").latency_ms is not None
    again = torchslim.AnalysisReport.from_dict(json.loads(report.to_json()))
    assert again.total_macs == report.total_macs and again.layers[1].name == report.layers[1].name


def test_cli_analyze_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["analyze", "torchvision:resnet18", "--input", "1,3,32,32", "--no-latency", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["total_macs"] == torchslim.analyze(__import__("torchvision").models.resnet18(), torch.randn(1, 3, 32, 32), latency=False).total_macs


@pytest.mark.parametrize("argv,needle", [
    (["analyze", "torchvision:nope", "--input", "1,3,8,8"], "unknown torchvision model 'nope'"),
    (["analyze", "missing.py:Net", "--input", "1,3,8,8"], "file not found"),
    (["analyze", "torchvision:resnet18", "--input", "1,3,8"], "rejected input shape(s) 1x3x8"),
    (["analyze", "torchvision:resnet18", "--input", "1,3,32,32", "--kwargs", "{bad"], "--kwargs is not valid JSON"),
    (["analyze", "torchslim:nope", "--input", "1,3,8,8"], "unknown torchslim model"),
    (["prune", "torchvision:resnet18", "--input", "1,3,32,32", "--ratio", "1.5", "--out", "x"], "ratio"),
])
def test_cli_errors_are_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchslim: error:") and needle in err and "\n" not in err


def test_cli_prune_writes_outputs(tmp_path):
    assert main(["prune", "torchslim:digits_cnn", "--input", "1,1,8,8", "--target-macs", "0.5", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["macs"][1] <= 0.5 * report["macs"][0]
    assert report["exact"] is True
    assert (tmp_path / "plan.json").exists()
    # a MACs target uses the per-layer latency table: the candidate removals were timed, the fastest kept
    assert sum(c["chosen"] for c in report["result"]["latency_candidates"]) == 1


def test_cli_prune_checkpoint_is_a_model_spec(tmp_path):
    """prune --out writes a torchslim checkpoint that every command takes as MODEL (rebuilt, not unpickled)."""
    from torchslim.cli._model_spec import load_model

    out = tmp_path / "pruned"
    assert main(["prune", "torchslim:digits_cnn", "--input", "1,1,8,8", "--ratio", "0.5", "--onnx",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "plan.json", "meta.json", "model.onnx"}
    assert report["onnx"]["ok"] is True and report["onnx"]["max_abs_error"] < 1e-4
    assert main(["analyze", str(out), "--input", "1,1,8,8", "--no-latency", "--json", str(tmp_path / "a.json")]) == 0
    analysed = json.loads((tmp_path / "a.json").read_text())
    assert analysed["total_params"] == report["params"][1] < report["params"][0]
    assert main(["analyze", str(out), "--no-latency", "--json", str(tmp_path / "b.json")]) == 0  # shapes recorded
    assert json.loads((tmp_path / "b.json").read_text())["input_shapes"] == [[1, 1, 8, 8]]
    assert analysed["total_macs"] == report["macs"][1]
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    loaded = load_model(str(out)).state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_demo_meets_its_promise(tmp_path):
    from torchslim.demo import run_demo

    report = run_demo(tmp_path, seed=0)
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.01
    assert report["latency_after_ms"] < report["latency_before_ms"]
    assert (tmp_path / "plot.png").stat().st_size > 0 and (tmp_path / "report.md").exists()


@pytest.mark.parametrize("build", [
    lambda: (__import__("torchvision").models.mobilenet_v2(), torch.randn(1, 3, 64, 64)),
    lambda: (nn.MultiheadAttention(32, 4, batch_first=True), ((torch.randn(1, 5, 32),) * 3, {"need_weights": False})),
    lambda: (__import__("torchslim.models", fromlist=["create_model"]).create_model("modnet"),
             ((torch.randn(1, 3, 64, 64),), {"inference": False})),
])
def test_pruner_estimates_count_like_the_analysis(build):
    """One convention: the graph's MACs estimate (used for targets) equals analyze's total."""
    from torchslim.graph import DependencyGraph
    from torchslim.graph.macs import estimate_macs

    model, inputs = build()
    model.eval()
    assert estimate_macs(DependencyGraph.build(model, inputs)) == torchslim.analyze(model, inputs, latency=False).total_macs


def test_cli_prune_with_recipe(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"criterion": "l2", "rules": [{"op_types": ["Conv2d"], "sparsity_per_layer": 0.5},
                                                                {"op_names": ["features.0"], "exclude": True}]}))
    out = tmp_path / "out"
    assert main(["prune", "torchslim:digits_cnn", "--input", "1,1,8,8", "--recipe", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["params"][1] < report["params"][0] and report["exact"] is True


def test_cli_bad_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": [{"op_names": ["nothing"], "sparsity": 0.5}]}))
    assert main(["prune", "torchslim:digits_cnn", "--input", "1,1,8,8", "--recipe", str(recipe), "--out", "x"]) == 2
    assert "rules[0]" in capsys.readouterr().err
