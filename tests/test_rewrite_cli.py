"""``torchslim rewrite``: the per-layer plan is printed, the checkpoint loads on a fresh original
and equals the rewritten model, report.json holds the measured numbers; bad flags are one-line
errors (exit 2) that write nothing."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import torchslim
from torchslim.cli import COMMANDS, main
from torchslim.models import create_model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rewrite_is_a_registered_command():
    assert COMMANDS["rewrite"] == "torchslim.cli.rewrite"


def test_separable_to_a_macs_target_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "sep"
    code = main(["rewrite", "torchslim:digits_cnn", "--input", "2,1,8,8", "--to", "separable", "--target-macs", "0.6",
                 "--repeats", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["macs"][1] <= 0.6 * report["macs"][0] * 1.01  # the analysis counts a little more than the layers
    assert report["layers"] and all(layer["name"] in printed for layer in report["layers"])
    assert "multiplier=" in printed and "fit error" in printed
    loaded = torchslim.load(out, create_model("digits_cnn"))
    assert all(type(loaded.get_submodule(layer["name"])).__name__ == "SeparableConv2d" for layer in report["layers"])
    x = torch.randn(2, 1, 8, 8)
    again = torchslim.load(out, create_model("digits_cnn"))
    assert torch.equal(loaded(x), again(x))


def test_plan_only_changes_nothing_and_writes_nothing(tmp_path, capsys):
    assert main(["rewrite", "torchslim:digits_cnn", "--input", "2,1,8,8", "--to", "lowrank", "--setting", "2",
                 "--plan-only"]) == 0
    assert "rank=2" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_data_aware_lowrank_from_a_python_file(tmp_path, capsys):
    (tmp_path / "nets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(16, 32)
                self.fc2 = nn.Linear(32, 4)

            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(x)))

        def batches():
            g = torch.Generator().manual_seed(0)
            return [(torch.randn(8, 16, generator=g), torch.zeros(8)) for _ in range(3)]
        """))
    out = tmp_path / "lr"
    assert main(["rewrite", f"{tmp_path / 'nets.py'}:Net", "--input", "8,16", "--to", "lowrank", "--setting", "3",
                 "--modules", "fc1", "--data", f"{tmp_path / 'nets.py'}:batches", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == ["fc1"] and 0 < report["layers"][0]["fit_error"] < 1


@pytest.mark.parametrize("flags, message", [
    (["--to", "lowrank", "--setting", "99"], "rank=99 is outside"),
    (["--to", "grouped", "--setting", "3", "--modules", "features.3"], "groups=3 does not divide"),
    (["--to", "lowrank", "--setting", "2", "--modules", "nothing"], "has no module 'nothing'"),
    (["--to", "lowrank", "--setting", "2"], "--out is required"),
    (["--to", "lowrank"], "exactly one of setting="),
])
def test_bad_flags_are_one_line_errors_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "x"
    extra = [] if "--out is required" in message else ["--out", str(out)]
    assert main(["rewrite", "torchslim:digits_cnn", "--input", "2,1,8,8", *flags, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
