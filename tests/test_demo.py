"""The demo in quick mode keeps its promise and writes every output; the CLI runs it."""
from __future__ import annotations

import json
import time

import pytest
import torch

import torchslim
from torchslim.cli import main

KEYS = {"accuracy_before", "accuracy_after", "macs_before", "macs_after", "latency_before_ms", "latency_after_ms",
        "params_before", "params_after", "steps", "seconds", "settings"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from torchslim.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    report = run_demo(out, seed=0, quick=True, progress=False)
    return out, report, time.perf_counter() - start


def test_quick_demo_meets_its_promise(quick_demo):
    out, report, seconds = quick_demo
    assert seconds < 60
    assert KEYS <= set(report)
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    assert report["params_after"] < report["params_before"]
    assert report["accuracy_after"] >= report["accuracy_before"] - 0.01
    assert report["accuracy_before"] > 0.9
    assert report["latency_after_ms"] < report["latency_before_ms"]


def test_quick_demo_steps_follow_the_schedule(quick_demo):
    _, report, _ = quick_demo
    steps = report["steps"]
    assert len(steps) == report["settings"]["steps"] == 2
    macs = [report["macs_before"]] + [s["macs"] for s in steps]
    assert all(b > a for a, b in zip(macs[1:], macs))  # every step removes something
    for s in steps:
        assert s["macs"] <= s["goal"] * report["macs_before"]
        assert {"accuracy", "accuracy_pruned", "params", "macs_ratio"} <= set(s)
    assert steps[-1]["macs"] == report["macs_after"]


def test_quick_demo_writes_its_outputs(quick_demo):
    out, report, _ = quick_demo
    assert json.loads((out / "report.json").read_text())["macs_after"] == report["macs_after"]
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| accuracy |" in md and "| MACs |" in md and "plot.png" in md
    plan = torchslim.PruningPlan.from_dict(json.loads((out / "pruned" / "plan.json").read_text()))
    assert len(plan.steps) == 2 and plan.num_removed > 0
    from torchslim.cli._model_spec import load_model
    from torchslim.models import create_model

    model = torchslim.load(out / "pruned", create_model("digits_cnn")).eval()
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    via_cli = load_model(str(out / "pruned"))  # the checkpoint records the spec it was built from
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(via_cli(x), model(x))


def test_demo_rejects_bad_targets(tmp_path):
    from torchslim.demo import run_demo

    with pytest.raises(ValueError, match="target_macs"):
        run_demo(tmp_path, target_macs=1.5)
    assert main(["demo", "--out", str(tmp_path), "--target-macs", "0"]) == 2


def test_cli_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--seed", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["seed"] == 1 and report["settings"]["quick"] is True
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    assert "torchslim demo" in capsys.readouterr().out


def test_demo_without_matplotlib_writes_the_report_and_says_there_is_no_plot(tmp_path, monkeypatch):
    """matplotlib is an extra: without it the demo used to end in 'unexpected ModuleNotFoundError'
    after all its work; now the report is complete, without the plot, and says why."""
    import io
    import sys

    from rich.console import Console

    from torchslim.demo import run_demo

    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ModuleNotFoundError
    (tmp_path / "plot.png").write_bytes(b"stale plot of an earlier run")
    printed = io.StringIO()
    report = run_demo(tmp_path, seed=0, quick=True, steps=1, epochs=2, finetune_epochs=1, progress=False,
                      console=Console(file=printed, width=200))
    assert report["plot"] is None and "matplotlib is not installed" in report["plot_skipped"]
    assert "torchslim[demo]" in report["plot_skipped"]
    assert json.loads((tmp_path / "report.json").read_text())["plot_skipped"] == report["plot_skipped"]
    md = (tmp_path / "report.md").read_text()
    assert "plot.png" not in md and "No plot: matplotlib is not installed" in md and "| MACs |" in md
    assert not (tmp_path / "plot.png").exists()
    assert "no plot: matplotlib is not installed" in printed.getvalue()
    assert (tmp_path / "pruned" / "model.safetensors").exists()


def test_quick_demo_records_its_plot(quick_demo):
    _, report, _ = quick_demo
    assert report["plot"] == "plot.png" and "plot_skipped" not in report


def test_cli_demo_without_scikit_learn_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "torchslim: error: torchslim demo trains on scikit-learn's bundled digits: pip install 'torchslim[demo]'"
