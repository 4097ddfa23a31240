"""``torchslim search``: a trained digits CNN searched under a MACs budget from the command
line; the checkpoint, recipe and history it writes are checked independently."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml

import torchslim
from torchslim.cli import main
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs

EVALUATOR = textwrap.dedent('''
    import torch
    from torchslim.demo import load_digits_tensors

    _, _, X, Y = load_digits_tensors(seed=0)
    CALLS = []

    def accuracy(model):
        CALLS.append(1)
        with torch.no_grad():
            return (model(X).argmax(1) == Y).float().mean().item()

    def broken(model):
        raise RuntimeError("validation set missing")
''')


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits CNN trained a few epochs, saved as a torchslim checkpoint (a MODEL for the CLI)."""
    from torchslim.demo import load_digits_tensors
    from torchslim.models import create_model

    torch.manual_seed(0)
    x, y, _, _ = load_digits_tensors(seed=0)
    model = create_model("digits_cnn", width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    root = tmp_path_factory.mktemp("search_cli")
    torch.save(model, root / "trained.pt")
    (root / "ev.py").write_text(EVALUATOR)
    return root, model


def _run(root, *flags):
    return main(["search", str(root / "trained.pt"),
                 "--input", "1,1,8,8", *flags])


def test_search_writes_a_checkpoint_that_meets_the_budget_recipe_and_history(trained):
    root, model = trained
    out = root / "sens"
    code = _run(root, "--method", "sensitivity", "--target-macs", "0.4", "--evaluator", f"{root / 'ev.py'}:accuracy",
                "--out", str(out))
    assert code == 0
    x = torch.randn(1, 1, 8, 8)
    original_macs = estimate_macs(DependencyGraph.build(model, x))
    loaded = torchslim.load(out, torch.load(root / "trained.pt", weights_only=False))
    assert estimate_macs(DependencyGraph.build(loaded, x)) <= 0.4 * original_macs
    summary = json.loads((out / "search.json").read_text())
    assert summary["macs"][1] == estimate_macs(DependencyGraph.build(loaded, x)) and summary["evaluations"] > 10
    lines = (out / "history.jsonl").read_text().splitlines()
    assert len(lines) == 1 + summary["evaluations"] and json.loads(lines[0])["method"] == "sensitivity"
    assert (out / "sensitivity.json").exists()
    # the recipe re-applies the chosen ratios through 'torchslim prune' to the same widths
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["ratios"] and all(isinstance(k, int) for k in recipe["ratios"])
    assert main(["prune", str(root / "trained.pt"), "--input", "1,1,8,8", "--recipe", str(out / "recipe.yaml"),
                 "--out", str(root / "again"), "--repeats", "1"]) == 0
    again = torchslim.load(root / "again", torch.load(root / "trained.pt", weights_only=False))
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in loaded.state_dict().items()}


def test_resume_continues_without_evaluating_again(trained):
    root, _ = trained
    out = root / "sa"
    flags = ["--method", "sa", "--target-macs", "0.5", "--evaluator", f"{root / 'ev.py'}:accuracy", "--max-evals",
             "6", "--seed", "1", "--out", str(out)]
    assert _run(root, *flags) == 0
    first = (out / "history.jsonl").read_text().splitlines()
    flags[flags.index("6")] = "9"
    assert _run(root, *flags, "--resume") == 0
    resumed = (out / "history.jsonl").read_text().splitlines()
    assert resumed[:len(first)] == first and len(resumed) == 1 + 9


def test_bad_input_is_one_line_naming_the_flag(trained, capsys):
    root, _ = trained
    base = ["--target-macs", "0.5", "--out", str(root / "bad")]
    assert _run(root, "--method", "anneal", "--evaluator", f"{root / 'ev.py'}:accuracy", *base) == 2
    assert "--method" in capsys.readouterr().err
    assert _run(root, "--method", "sa", "--evaluator", f"{root / 'ev.py'}:nothing_here", *base) == 2
    assert "nothing_here" in capsys.readouterr().err
    assert _run(root, "--method", "sa", "--evaluator", f"{root / 'ev.py'}:accuracy", "--max-evals", "0", *base) == 2
    assert "--max-evals must be >= 1" in capsys.readouterr().err
    assert _run(root, "--method", "sa", "--evaluator", f"{root / 'ev.py'}:accuracy", "--resume", *base) == 2
    assert "--resume" in capsys.readouterr().err
    assert _run(root, "--method", "sa", "--evaluator", f"{root / 'ev.py'}:broken", *base) == 2
    err = capsys.readouterr().err
    assert "validation set missing" in err and "--resume" in err


ADMM_TRAIN = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torchslim.demo import load_digits_tensors

    X, Y, _, _ = load_digits_tensors(seed=0)
    STEPS = []

    def admm_train(model, admm):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for i in range(0, len(X), 128):
            optimizer.zero_grad()
            (F.cross_entropy(model(X[i:i + 128]), Y[i:i + 128]) + admm.penalty()).backward()
            optimizer.step()
            admm.step()
            STEPS.append(1)

    calibration = [X[:256]]
''')


def test_autocompress_writes_the_retrained_compressed_model_and_its_rounds(trained):
    root, model = trained
    (root / "ac.py").write_text(ADMM_TRAIN)
    out = root / "ac"
    code = _run(root, "--method", "autocompress", "--target-macs", "0.3", "--rounds", "2", "--max-evals", "3",
                "--evaluator", f"{root / 'ev.py'}:accuracy", "--admm-train", f"{root / 'ac.py'}:admm_train",
                "--data", f"{root / 'ac.py'}:calibration", "--out", str(out))
    assert code == 0
    x = torch.randn(1, 1, 8, 8)
    original_macs = estimate_macs(DependencyGraph.build(model, x))
    loaded = torchslim.load(out, torch.load(root / "trained.pt", weights_only=False)).eval()
    assert 0.28 * original_macs <= estimate_macs(DependencyGraph.build(loaded, x)) <= 0.3 * original_macs
    summary = json.loads((out / "search.json").read_text())
    assert [r["evaluations"] for r in summary["rounds"]] == [3, 3]
    assert summary["macs"][1] == estimate_macs(DependencyGraph.build(loaded, x))
    for index in (1, 2):
        assert (out / f"round{index}.jsonl").exists() and (out / f"round{index}" / "round.json").exists()
    # the checkpoint holds the retrained weights: the model the last round saved, exactly
    last = torchslim.load(out / "round2", torch.load(root / "trained.pt", weights_only=False)).eval()
    torch.testing.assert_close(loaded(x), last(x))


def test_autocompress_flags_are_checked_before_anything_runs(trained, capsys):
    root, _ = trained
    for flags, message in [([], "needs --admm-train"), (["--admm-train", "x.py:f", "--rounds", "0"], "--rounds"),
                           (["--admm-train", "x.py:f", "--target-latency", "0.5"], "netadapt")]:
        budget = [] if "--target-latency" in flags else ["--target-macs", "0.5"]
        assert _run(root, "--method", "autocompress", *budget, "--evaluator", f"{root / 'ev.py'}:accuracy", *flags,
                    "--out", str(root / "never")) != 0
        assert message in capsys.readouterr().err
    assert _run(root, "--method", "sa", "--target-macs", "0.5", "--evaluator", f"{root / 'ev.py'}:accuracy",
                "--admm-train", "x.py:f", "--out", str(root / "never")) != 0
    assert "--admm-train is for --method autocompress" in capsys.readouterr().err
    assert not (root / "never").exists()


def test_amc_writes_the_pruned_checkpoint_history_and_policy(trained):
    root, model = trained
    out = root / "amc"
    code = _run(root, "--method", "amc", "--target-macs", "0.4", "--episodes", "6", "--warmup", "3",
                "--evaluator", f"{root / 'ev.py'}:accuracy", "--out", str(out))
    assert code == 0
    x = torch.randn(1, 1, 8, 8)
    original_macs = estimate_macs(DependencyGraph.build(model, x))
    loaded = torchslim.load(out, torch.load(root / "trained.pt", weights_only=False))
    assert 0.36 * original_macs <= estimate_macs(DependencyGraph.build(loaded, x)) <= 0.4 * original_macs
    summary = json.loads((out / "search.json").read_text())
    assert summary["method"] == "amc" and summary["evaluations"] == 6
    assert (out / "history.jsonl.policy.pt").exists() and (out / "recipe.yaml").exists()
