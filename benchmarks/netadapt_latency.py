"""NetAdapt under a latency budget, checked by measurement (issue 13's goal: within 10%).

``NetAdaptSearch(target_latency=0.5)`` plans on the per-layer latency table (each layer shape
timed once on this machine, cached); this script then times the original and the pruned
model in turn (rounds, best kept) and reports measured latency / original next to the
budget and the table's prediction. The evaluator is the cosine similarity of the pruned
model's outputs to the original's on a fixed batch (no training data needed; the goal here
is the budget, not accuracy). Writes benchmarks/results/netadapt_latency.json.
Usage: python benchmarks/netadapt_latency.py [--models resnet18 mobilenet_v2] [--target 0.5]
       [--threads 1] [--side 224] [--initial-cut 0.05] [--runs 3]
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

from torchslim import PruneConfig
from torchslim.latency import measure_in_turn
from torchslim.search import NetAdaptSearch


def cosine_evaluator(model: torch.nn.Module, batch: torch.Tensor):
    with torch.no_grad():
        reference = model(batch).flatten(1)

    def evaluate(candidate: torch.nn.Module) -> float:
        with torch.no_grad():
            return torch.nn.functional.cosine_similarity(candidate(batch).flatten(1), reference).mean().item()

    return evaluate


def run_model(name: str, target: float, threads: int, side: int, initial_cut: float, runs: int) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, side, side)
    evaluate = cosine_evaluator(model, torch.randn(4, 3, side, side))
    start = time.perf_counter()
    search = NetAdaptSearch(model, (x,), evaluate, target_latency=target, initial_cut=initial_cut, seed=0,
                            config=PruneConfig(latency_threads=threads))  # the table is timed at these threads
    result = search.run()
    seconds = time.perf_counter() - start
    pruned = copy.deepcopy(model)
    result.apply_(pruned, (x,))
    ratios = []
    for _ in range(runs):
        stats = measure_in_turn({"original": model, "pruned": pruned}, (x,), threads=threads)
        ratios.append(stats["pruned"].median_ms / stats["original"].median_ms)
    predicted = result.latency_ms / result.original.latency_ms if result.latency_ms else None
    measured = statistics.median(ratios)
    return {"model": name, "target": target, "predicted_ratio": predicted, "measured_ratio": measured,
            "measured_runs": ratios, "within_10pct": abs(measured - target) <= 0.1 * target,
            "macs_ratio": result.macs / result.original.macs, "evaluations": len(result.history),
            "iterations": len(search.iterations), "score": result.score, "search_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="threads the latency is measured at (the table's)")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--initial-cut", type=float, default=0.05)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run_model(m, args.target, args.threads, args.side, args.initial_cut, args.runs) for m in args.models]
    table = Table(title=f"NetAdapt target_latency={args.target} at {args.threads} thread(s), 1x3x{args.side}x{args.side}")
    for column in ("model", "predicted", "measured (runs)", "within 10%", "MACs", "evals", "iters", "cosine", "s"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["model"], f"{r['predicted_ratio']:.3f}",
                      f"{r['measured_ratio']:.3f} ({', '.join(f'{v:.3f}' for v in r['measured_runs'])})",
                      str(r["within_10pct"]), f"{r['macs_ratio']:.3f}", str(r["evaluations"]), str(r["iterations"]),
                      f"{r['score']:.4f}", f"{r['search_seconds']:.0f}")
    Console().print(table)
    out = Path(__file__).parent / "results" / "netadapt_latency.json"
    machine = {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "threads": args.threads}
    out.write_text(json.dumps({"machine": machine, "settings": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
