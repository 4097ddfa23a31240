"""Prune every torchvision model (weights=None) at 50% and check forward + exactness.

Runs the library's defaults (exact groups first, tolerances by dtype); each row says whether the
pruned model equals the zeroed original or, where inexact groups were pruned, their measured
deviation. Prints a rich table and writes benchmarks/results/coverage_torchvision.json.
Usage: python benchmarks/coverage_torchvision.py [--ratio 0.5 | --target-macs 0.5] [--only NAME ...]
       [--exact-only default|true|false] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import traceback
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

from _coverage import add_config_arguments, config_kwargs, exactness, prune_and_check, summarize

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


def run_one(name: str, kwargs: dict) -> dict:
    torch.manual_seed(0)
    model, inputs = build(name)
    randomize_bn_(model)
    return {"model": name, "kind": _kind(name), **prune_and_check(model, inputs, kwargs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "coverage_torchvision.json")
    args = parser.parse_args()
    names = args.only or [n for n in torchvision.models.list_models() if n not in SKIP_BIG]
    console = Console()
    rows = []
    for name in names:
        try:
            row = run_one(name, config_kwargs(args))
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures
            row = {"model": name, "kind": _kind(name), "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300],
                   "trace": traceback.format_exc()[-800:]}
        rows.append(row)
        console.print(row if not row["ok"] else {k: row[k] for k in ("model", "seconds", "params_ratio", "macs_ratio", "exact",
                                                                          "inexact_deviation", "retries")})
    table = Table(title=f"torchvision coverage, PruneConfig({config_kwargs(args)})")
    for col in ("model", "kind", "ok", "pruned", "exact / deviation", "params", "MACs", "s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["kind"], str(r["ok"]), str(r.get("pruned")), exactness(r),
                      f"{r.get('params_ratio', 0):.2f}", f"{r.get('macs_ratio', 0):.2f}", str(r.get("seconds", "-")))
    console.print(table)
    summary = summarize(rows)
    console.print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                "threads": torch.get_num_threads()},
                                    "config": config_kwargs(args),
                                    "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
