"""Prune a seeded sample of timm models (pretrained=False) at 50% and check exactness.

Prints a rich table and writes benchmarks/results/coverage_timm.json.
Each model runs in its own process with a time limit (--timeout), at its native input size capped
to 224 unless the model fixes its size.
Usage: python benchmarks/coverage_timm.py [--n 100] [--seed 0] [--only NAME ... [--update]] [--timeout 600]
       [--ratio 0.5 | --target-macs 0.5] [--exact-only default|true|false] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table

from _coverage import add_config_arguments, config_flags, config_kwargs, exactness, prune_and_check, summarize

MAX_SIDE = 224


def sample(n: int, seed: int) -> list[str]:
    names = sorted(timm.list_models())
    # one model per family keeps the sample diverse (families differ more than their sizes)
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(name.split("_")[0].rstrip("0123456789"), []).append(name)
    rng = random.Random(seed)
    picked = [rng.choice(sorted(v)) for _, v in sorted(families.items())]
    rng.shuffle(picked)
    return sorted(picked[:n])


def run_one(name: str, kwargs: dict) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    cfg = model.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))
    x = torch.rand(1, *size)
    if not cfg.get("fixed_input_size", False):  # coupling does not depend on resolution: keep it cheap
        small = torch.rand(1, size[0], min(size[1], MAX_SIDE), min(size[2], MAX_SIDE))
        try:
            with torch.no_grad():
                model(small)
            x = small
        except Exception:  # noqa: BLE001 - the model fixes its size after all (e.g. attention feat_size)
            pass
    return {"model": name, **prune_and_check(model, x, kwargs)}


def run_isolated(name: str, flags: list[str], timeout: float) -> dict:
    """One model in its own process: a crash or a hang is a recorded failure, memory is returned."""
    command = [sys.executable, __file__, "--one", name, *flags]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "ok": False, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "ok": False, "error": f"exit {done.returncode}: {tail}"[:300],
                "seconds": round(time.perf_counter() - start, 1)}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    add_config_arguments(parser)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model (its own process)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--update", action="store_true", help="with --only: replace those rows in the existing JSON")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "coverage_timm.json")
    args = parser.parse_args()
    console = Console()
    if args.one:  # child process: one model, one JSON line on stdout
        try:
            row = run_one(args.one, config_kwargs(args))
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures
            row = {"model": args.one, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(row))
        return
    rows = []
    for name in args.only or sample(args.n, args.seed):
        rows.append(run_isolated(name, config_flags(args), args.timeout))
        console.print(rows[-1])
    if args.update and args.out.exists():  # rerun a few models inside the full sample's results
        fresh = {r["model"]: r for r in rows}
        rows = [fresh.pop(r["model"], r) for r in json.loads(args.out.read_text())["rows"]] + list(fresh.values())
    table = Table(title=f"timm sample, PruneConfig({config_kwargs(args)})")
    for col in ("model", "ok", "pruned", "exact / deviation", "params", "MACs", "s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], str(r["ok"]), str(r.get("pruned")), exactness(r),
                      f"{r.get('params_ratio', 0):.2f}", f"{r.get('macs_ratio', 0):.2f}", str(r.get("seconds", "-")))
    console.print(table)
    summary = summarize(rows)
    console.print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                "timm": timm.__version__}, "config": config_kwargs(args), "summary": summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
