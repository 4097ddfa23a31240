"""Prune every torchvision model (weights=None) at 50% and check forward + exactness.

Prints a rich table and writes benchmarks/results/coverage_torchvision.json.
Usage: python benchmarks/coverage_torchvision.py [--ratio 0.5] [--only NAME ...] [--exact-only]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import traceback
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

import torchslim

SIZES = {"classification": 224, "segmentation": 224, "detection": 224, "optical_flow": 128, "video": 64}
SKIP_BIG = {"vit_h_14", "regnet_y_128gf"}  # minutes of CPU each at 224px: run with --only


def build(name: str):
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None) if _takes_backbone(name) \
        else torchvision.models.get_model(name, weights=None)
    model.eval()
    kind = _kind(name)
    size = 299 if name == "inception_v3" else SIZES[kind]
    if kind == "detection":
        inputs = ([torch.rand(3, size, size)],)
    elif kind == "optical_flow":
        inputs = (torch.rand(1, 3, size, size), torch.rand(1, 3, size, size))
    elif kind == "video":
        frames, side = (16, 224) if name.startswith(("mvit", "s3d")) else (8, size)
        inputs = (torch.rand(1, 3, frames, side, side),)
    else:
        inputs = (torch.rand(1, 3, size, size),)
    return model, inputs


def _kind(name: str) -> str:
    for kind, module in (("detection", torchvision.models.detection), ("segmentation", torchvision.models.segmentation),
                         ("optical_flow", torchvision.models.optical_flow), ("video", torchvision.models.video)):
        if name in torchvision.models.list_models(module):
            return kind
    return "classification"


def _takes_backbone(name: str) -> bool:
    return _kind(name) in ("detection", "segmentation")


def randomize_bn_(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def run_one(name: str, ratio: float, exact_only: bool) -> dict:
    torch.manual_seed(0)
    model, inputs = build(name)
    randomize_bn_(model)
    original = copy.deepcopy(model)
    start = time.perf_counter()
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=ratio, exact_only=exact_only))
    seconds = time.perf_counter() - start
    exact_groups = all(not s for s in result.skipped)
    report = torchslim.verify(original, model, inputs, result.plan, atol=1e-4, rtol=1e-3)
    return {
        "model": name, "kind": _kind(name), "ok": True, "seconds": round(seconds, 2),
        "params_ratio": result.params_after / result.params_before,
        "macs_ratio": result.macs_after / max(result.macs_before, 1),
        "exact": bool(report.ok), "max_abs_error": report.max_abs_error, "retries": len(result.skipped),
        "pruned": bool(result.plan), "exact_groups_only": exact_only and exact_groups,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--exact-only", action="store_true", default=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "coverage_torchvision.json")
    args = parser.parse_args()
    names = args.only or [n for n in torchvision.models.list_models() if n not in SKIP_BIG]
    console = Console()
    rows = []
    for name in names:
        try:
            row = run_one(name, args.ratio, args.exact_only)
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures
            row = {"model": name, "kind": _kind(name), "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300],
                   "trace": traceback.format_exc()[-800:]}
        rows.append(row)
        console.print(row if not row["ok"] else {k: row[k] for k in ("model", "seconds", "params_ratio", "macs_ratio", "exact", "retries")})
    table = Table(title=f"torchvision coverage at ratio {args.ratio}")
    for col in ("model", "kind", "ok", "pruned", "exact", "params", "MACs", "s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["kind"], str(r["ok"]), str(r.get("pruned")), str(r.get("exact")),
                      f"{r.get('params_ratio', 0):.2f}", f"{r.get('macs_ratio', 0):.2f}", str(r.get("seconds", "-")))
    console.print(table)
    summary = {"ok": sum(r["ok"] for r in rows), "exact": sum(bool(r.get("exact")) for r in rows), "total": len(rows)}
    console.print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                "threads": torch.get_num_threads()},
                                    "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
