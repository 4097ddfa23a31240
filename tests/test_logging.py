"""What the library skips or falls back on is logged on the ``torchslim`` logger (and only there)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim

TESTS = Path(__file__).parent


class Cummax(nn.Module):
    """``cummax`` over channels has no channel rule: the convs around it cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.b(torch.cummax(self.a(x), 1).values))


class Literal(nn.Module):
    """A reshape to a literal 16 that no attribute holds: removing channels of ``a`` fails."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(self.a(x).reshape(1, 16, -1).reshape(1, 16, 4, 4))


def test_op_without_rule_is_logged_with_op_and_module(caplog):
    with caplog.at_level(logging.INFO, logger="torchslim"):
        graph = torchslim.DependencyGraph.build(Cummax().eval(), torch.randn(1, 3, 8, 8))
    records = [r for r in caplog.records if r.name == "torchslim.graph.dependency"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "aten.cummax.default in module '<root>'" in records[0].getMessage()
    assert "no channel rule" in records[0].getMessage()
    assert [b.op for b in graph.blockers] == ["aten.cummax.default"]


def test_model_with_rules_for_every_op_logs_nothing(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with caplog.at_level(logging.DEBUG, logger="torchslim"):
        torchslim.DependencyGraph.build(model, torch.randn(1, 3, 8, 8))
    assert not [r for r in caplog.records if r.name.startswith("torchslim")]


def test_rolled_back_removal_is_logged_with_its_reason(caplog):
    with caplog.at_level(logging.INFO, logger="torchslim"), pytest.warns(UserWarning, match="rolled back"):
        result = torchslim.prune_(Literal().eval(), torch.randn(1, 3, 4, 4), torchslim.PruneConfig(ratio=0.5))
    logged = [r.getMessage() for r in caplog.records if r.name == "torchslim.pruning.prune"]
    assert logged and all("rolled back" in m and "aten.view.default" in m for m in logged)
    assert len(logged) == len(result.skipped)


def test_groups_left_out_by_exclude_are_logged_at_debug(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with caplog.at_level(logging.DEBUG, logger="torchslim"):
        torchslim.prune_(model, torch.randn(1, 3, 12, 12), torchslim.PruneConfig(ratio=0.5, exclude=["0"]))
    left_out = [r.getMessage() for r in caplog.records if r.name == "torchslim.pruning.selector"]
    assert left_out == ["group 0 (modules 0, 2) left out: it touches a module that exclude/protect_inputs/filter_fn keeps"]
    assert model[0].out_channels == 8 and model[2].out_channels == 4


def test_unconfigured_logging_prints_nothing_and_cli_verbose_shows_it(tmp_path):
    """A library must not print through the root logger's last-resort handler; ``-v`` opts in."""
    code = (f"import torch, torchslim, sys; sys.path.insert(0, {str(TESTS)!r}); from test_logging import Cummax; "
            "torchslim.DependencyGraph.build(Cummax().eval(), torch.randn(1, 3, 8, 8))")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "cummax" not in quiet.stderr + quiet.stdout
    (tmp_path / "m.py").write_text("from test_logging import Cummax as M\n")
    cli = [sys.executable, "-m", "torchslim", "-v", "prune", f"{tmp_path / 'm.py'}:M", "--input", "1,3,8,8",
           "--ratio", "0.5", "--out", str(tmp_path / "out")]
    loud = subprocess.run(cli, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert loud.returncode == 0, loud.stderr
    assert "torchslim: Cummax: 1 op call(s) without a usable channel rule pin every dimension they touch: " \
           "aten.cummax.default in module '<root>'" in loud.stderr
