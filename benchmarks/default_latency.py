"""Measured speed of the default call: ``prune_(model, x, PruneConfig(target_macs=level))``.

Issue 11's goal: the default MACs target (no latency table, no flags) should give latency/MACs
<= 1.15 on ResNet-50 and the MODNet-shaped net at 2 threads, batch 1, eager. For each model
this prunes with the default, with ``latency_aware=False`` (every group cut alike: the old
default, the seed author's 1.28) and, unless --no-table, with the measured latency table
(``latency_aware=True, round_to="latency"``), then times the original and the pruned models
in turn (rounds, best kept) and prints latency ratio / MACs ratio. Writes
benchmarks/results/default_latency.json.
Usage: python benchmarks/default_latency.py [--models resnet50 modnet mobilenet_v2] [--level 0.5]
       [--threads 2] [--runs 3] [--modnet-side 512] [--no-table]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

import torchslim
from torchslim.latency import measure_in_turn

VARIANTS = {
    "default": {},
    "alike (latency_aware=False)": {"latency_aware": False},
    "measured table": {"latency_aware": True, "round_to": "latency", "max_sparsity_per_layer": 0.75},
}


def build(name: str, modnet_side: int = 512):
    if name == "modnet":  # the brief's size (seeds/000 times MODNet at 512x512)
        from torchslim.models import create_model

        return create_model("modnet").eval(), (torch.randn(1, 3, modnet_side, modnet_side), False)
    return getattr(torchvision.models, name)().eval(), (torch.randn(1, 3, 224, 224),)


def prune(model, inputs, level: float, threads: int, fields: dict):
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    config = torchslim.PruneConfig(target_macs=level, latency_threads=threads, verify=False, **fields)
    result = torchslim.prune_(pruned, inputs, config)
    return pruned, result.macs_after / result.macs_before, time.perf_counter() - start


def model_rows(name: str, level: float, threads: int, runs: int, variants: dict, modnet_side: int) -> list[dict]:
    model, inputs = build(name, modnet_side)
    pruned = {label: prune(model, inputs, level, threads, fields) for label, fields in variants.items()}
    ratios: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(runs):  # separate interleaved measurements: the spread shows the noise
        stats = measure_in_turn({"original": model, **{k: v[0] for k, v in pruned.items()}}, inputs,
                                threads=threads, rounds=5, warmup=3, repeats=15)
        for label in variants:
            ratios[label].append(stats[label].median_ms / stats["original"].median_ms)
    rows = []
    for label, (_, macs_ratio, seconds) in pruned.items():
        latency = statistics.median(ratios[label])
        rows.append({"model": name, "variant": label, "macs_ratio": macs_ratio, "latency_ratio": latency,
                     "latency_ratios": ratios[label], "latency_per_macs": latency / macs_ratio,
                     "prune_seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "modnet", "mobilenet_v2"])
    parser.add_argument("--level", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modnet-side", type=int, default=512)
    parser.add_argument("--no-table", action="store_true", help="skip the measured-table variant")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "default_latency.json"))
    args = parser.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_table and v.get("latency_aware"))}
    rows = [row for name in args.models for row in model_rows(name, args.level, args.threads, args.runs, variants, args.modnet_side)]
    table = Table(title=f"target_macs={args.level}, {args.threads} threads, batch 1, eager "
                        f"(latency: median of {args.runs} interleaved runs)")
    for column in ("model", "variant", "MACs", "latency", "latency/MACs", "runs", "prune s"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["model"], r["variant"], f"{r['macs_ratio']:.3f}", f"{r['latency_ratio']:.3f}",
                      f"{r['latency_per_macs']:.2f}", " ".join(f"{x:.2f}" for x in r["latency_ratios"]),
                      f"{r['prune_seconds']:.1f}")
    Console().print(table)
    machine = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "load_average": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "level": args.level, "threads": args.threads,
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
