"""benchmarks/slimmable.py's ``--add``: a sweep run a seed at a time keeps the rows --out already
holds for other seeds, with their width keys floats again, and refuses rows run with other settings."""
from __future__ import annotations

import json
import types

import pytest

from _benchmarks import load_benchmark

slimmable = load_benchmark("slimmable")


def _row(seed: int, accuracy: float) -> dict:
    widths = dict.fromkeys(slimmable.WIDTHS, accuracy)
    return {"model": "resnet18", "seed": seed, "us_net": widths, "individual": widths, "prune_finetune": widths,
            "macs": {w: 1000 * w * w for w in slimmable.WIDTHS},
            "latency_ms": {w: {"slimmable": 2.0, "exported": 1.0} for w in slimmable.WIDTHS},
            "autoslim": {b: {"macs": b, "uniform_width": b, "uniform_macs": b, "after": accuracy,
                             "uniform_after": accuracy, "finetuned": accuracy, "uniform_finetuned": accuracy,
                             "evaluations": 3, "seconds": 1.0} for b in slimmable.AUTOSLIM_BUDGETS}}


def _args(tmp_path, **settings) -> types.SimpleNamespace:
    base = {"models": ["resnet18"], "seeds": [0], "epochs": 15, "finetune_epochs": 2, "lr": 0.05, "threads": 1,
            "layerwise": False, "distill_warmup": 0, "add": True, "out": tmp_path / "slim.json"}
    return types.SimpleNamespace(**{**base, **settings})


def test_add_keeps_the_other_seeds_rows_and_summarizes_them_with_the_new_ones(tmp_path):
    slimmable.write(_args(tmp_path, seeds=[0]), [_row(0, 90.0)])
    slimmable.write(_args(tmp_path, seeds=[1]), [_row(1, 80.0)])
    written = json.loads((tmp_path / "slim.json").read_text())
    assert [r["seed"] for r in written["rows"]] == [0, 1] and written["settings"]["seeds"] == [0, 1]
    first = next(s for s in written["summary"] if s.get("width") == 0.25)
    assert first["seeds"] == 2 and first["us_net"][0] == pytest.approx(85.0)
    slimmable.write(_args(tmp_path, seeds=[1]), [_row(1, 70.0)])  # a seed run again replaces its row
    rows = json.loads((tmp_path / "slim.json").read_text())["rows"]
    assert [r["us_net"]["0.25"] for r in rows] == [90.0, 70.0]


def test_add_refuses_rows_run_with_other_settings(tmp_path):
    slimmable.write(_args(tmp_path), [_row(0, 90.0)])
    with pytest.raises(SystemExit, match="epochs=15"):
        slimmable.write(_args(tmp_path, epochs=30, seeds=[1]), [_row(1, 80.0)])
    with pytest.raises(SystemExit, match="distill_warmup=0"):
        slimmable.write(_args(tmp_path, distill_warmup=8, seeds=[1]), [_row(1, 80.0)])


def test_latency_only_replaces_the_latency_columns_and_keeps_the_rest(tmp_path, monkeypatch):
    row = {**_row(0, 90.0), "model": "digits_cnn"}
    slimmable.write(_args(tmp_path, models=["digits_cnn"]), [row])
    measured = {w: {"slimmable": 0.2, "exported": 0.1} for w in slimmable.WIDTHS}
    seen = []
    monkeypatch.setattr(slimmable, "latencies", lambda slim, x: seen.append(slim) or measured)
    rerun = slimmable.rerun_latency("digits_cnn", 0, _args(tmp_path, models=["digits_cnn"], latency_only=True))
    assert rerun["latency_ms"] == measured and len(seen) == 1 and hasattr(seen[0], "at_width")
    assert {k: v for k, v in rerun.items() if k != "latency_ms"} == \
        {k: v for k, v in slimmable.float_keys(json.loads(json.dumps(row))).items() if k != "latency_ms"}
    with pytest.raises(SystemExit, match="no row for digits_cnn seed 1"):
        slimmable.rerun_latency("digits_cnn", 1, _args(tmp_path, models=["digits_cnn"]))


def test_coverage_add_keeps_the_other_models_rows_and_lists_only_the_big_ones_still_unchecked(tmp_path):
    coverage = load_benchmark("coverage_slimmable")
    out = tmp_path / "coverage.json"
    coverage.write(out, [{"model": "resnet18", "ok": True}, {"model": "vit_b_16", "ok": False}], add=False)
    coverage.write(out, [{"model": "vit_b_16", "ok": True}, {"model": "vit_h_14", "ok": True}], add=True)
    written = json.loads(out.read_text())
    assert [r["model"] for r in written["rows"]] == ["resnet18", "vit_b_16", "vit_h_14"]
    assert (written["ok"], written["total"]) == (3, 3)
    assert "vit_b_16" not in written["skipped_big"] and "vit_l_16" in written["skipped_big"]
    coverage.write(out, [{"model": "alexnet", "ok": True}], add=False)  # without --add: only this run's rows
    assert [r["model"] for r in json.loads(out.read_text())["rows"]] == ["alexnet"]
