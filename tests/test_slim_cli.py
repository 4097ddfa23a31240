"""``torchslim slim`` then ``torchslim autoslim`` on the digits CNN: a slimmable checkpoint trained
by a user function, then a greedy width search under a MACs budget; the checkpoints they write
are checked independently (shapes, MACs, loading as MODEL)."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import torchslim
from torchslim.cli import main
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

USER = textwrap.dedent('''
    import torch
    from torchslim.demo import load_digits_tensors
    from torchslim.slimmable import train_sandwich

    X, Y, XT, YT = load_digits_tensors(seed=0)
    TRAINED = []

    def sandwich(slim):
        loader = [(X[i:i + 128], Y[i:i + 128]) for i in range(0, len(X), 128)]
        TRAINED.append(train_sandwich(slim, loader, epochs=2, lr=0.05))

    def accuracy(model):
        with torch.no_grad():
            return (model(XT).argmax(1) == YT).float().mean().item()

    calibration = [X[:128], X[128:256]]
''')


def test_slim_then_autoslim_from_the_command_line(tmp_path, capsys):
    (tmp_path / "user.py").write_text(USER)
    slim_dir, auto_dir = tmp_path / "slim", tmp_path / "auto"
    assert main(["slim", "torchslim:digits_cnn", "--input", "1,1,8,8", "--width-range", "0.25,1", "--widths",
                 "0.25,0.5,1", "--train", f"{tmp_path / 'user.py'}:sandwich", "--out", str(slim_dir)]) == 0
    summary = json.loads((slim_dir / "slim.json").read_text())
    macs = [row["macs"] for row in summary["widths"]]
    assert [row["width"] for row in summary["widths"]] == [0.25, 0.5, 1.0] and macs == sorted(macs)
    assert "slimmable" in capsys.readouterr().out
    # the slimmable checkpoint is an ordinary one too: loads as MODEL at full width
    full = torchslim.load(slim_dir, create_model("digits_cnn"))
    assert sum(p.numel() for p in full.parameters()) == summary["widths"][-1]["params"]
    assert main(["autoslim", str(slim_dir), "--target-macs", "0.5", "--evaluator", f"{tmp_path / 'user.py'}:accuracy",
                 "--data", f"{tmp_path / 'user.py'}:calibration", "--out", str(auto_dir)]) == 0
    result = json.loads((auto_dir / "autoslim.json").read_text())
    slimmed = torchslim.load(auto_dir, torchslim.load(slim_dir, create_model("digits_cnn")))
    x = torch.randn(1, 1, 8, 8)
    found = estimate_macs(DependencyGraph.build(slimmed, x))
    assert found == result["macs"][1] and 0.49 * result["macs"][0] <= found <= 0.5 * result["macs"][0]
    assert (auto_dir / "history.jsonl").read_text().count("\n") >= result["evaluations"]
    assert "uniform width at the budget" in (auto_dir / "history.jsonl").read_text().splitlines()[-1]
    greedy_dir = tmp_path / "greedy"
    assert main(["autoslim", str(slim_dir), "--target-macs", "0.5", "--evaluator", f"{tmp_path / 'user.py'}:accuracy",
                 "--data", f"{tmp_path / 'user.py'}:calibration", "--no-uniform-baseline", "--out", str(greedy_dir)]) == 0
    greedy = json.loads((greedy_dir / "autoslim.json").read_text())
    assert greedy["evaluations"] == result["evaluations"] - 1 and not greedy["kept_uniform"]
    assert "uniform width" not in (greedy_dir / "history.jsonl").read_text()
    # the same greedy path: the same widths, unless the first run returned the uniform width instead
    assert (greedy["widths"] == result["widths"]) != result["kept_uniform"]


def test_autoslim_refuses_a_checkpoint_that_is_not_slimmable(tmp_path):
    model = create_model("digits_cnn")
    torchslim.save(model, tmp_path / "plain", metadata={"source": {"model": "torchslim:digits_cnn", "model_kwargs": {},
                                                                   "inputs": ["1,1,8,8"], "kwargs": {}, "dtype": None}})
    (tmp_path / "user.py").write_text(USER)
    code = main(["autoslim", str(tmp_path / "plain"), "--target-macs", "0.5", "--evaluator",
                 f"{tmp_path / 'user.py'}:accuracy", "--data", f"{tmp_path / 'user.py'}:calibration",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "o").exists()
