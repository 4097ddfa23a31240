"""What one search evaluation pays: apply a candidate removal and roll it back, per model.

For each model a candidate (the least important quarter of every exact group, by L1) is
planned (``plan_removal``), applied and rolled back (``with applied(graph, plan)``), next to one
plain forward pass of the unpruned model and a fresh ``prune_`` at the same ratio (trace, graph,
ranking, surgery, verification). The goal: apply+rollback well under one forward.

Prints a rich table and writes benchmarks/results/apply_rollback.json (machine described).
Usage: python benchmarks/apply_rollback.py [--models resnet50 vit_b_16 modnet] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from rich.console import Console
from rich.table import Table

import torchslim
from torchslim.graph import DependencyGraph
from torchslim.pruning import applied, channel_order, plan_removal


def build(name: str):
    torch.manual_seed(0)
    if name == "modnet":
        from torchslim.models import create_model

        return create_model("modnet").eval(), (torch.randn(1, 3, 256, 256), False)
    return getattr(torchvision.models, name)().eval(), (torch.randn(1, 3, 224, 224),)


def candidate(graph: DependencyGraph) -> np.ndarray:
    """The least important quarter (L1) of every exact group: what a uniform search step tries."""
    parts = [channel_order(graph, g, "l1")[: len(g) // 4] for g in graph.groups if g.exact and len(g) >= 4]
    return np.concatenate(parts)


def best_seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls (after one warm-up): the cost without machine noise."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, repeats: int) -> dict:
    model, inputs = build(name)
    graph = DependencyGraph.build(model, inputs)
    removed = candidate(graph)
    plan = plan_removal(graph, removed)

    def apply_rollback() -> None:
        with applied(graph, plan):
            pass

    def forward() -> None:
        with torch.no_grad():
            model(*inputs)

    plan_s = best_seconds(lambda: plan_removal(graph, removed), repeats)
    apply_s = best_seconds(apply_rollback, repeats)
    forward_s = best_seconds(forward, max(3, repeats // 4))
    fresh, fresh_inputs = build(name)
    start = time.perf_counter()
    torchslim.prune_(fresh, fresh_inputs, torchslim.PruneConfig(ratio=0.25))
    prune_s = time.perf_counter() - start
    return {"model": name, "atoms_removed": int(removed.size), "tensors_sliced": len(plan.kept),
            "plan_ms": plan_s * 1e3, "apply_rollback_ms": apply_s * 1e3,
            "plan_apply_rollback_ms": (plan_s + apply_s) * 1e3, "forward_ms": forward_s * 1e3,
            "prune_ms": prune_s * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16", "modnet"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = [measure(name, args.repeats) for name in args.models]
    table = Table(title="Per-candidate apply + rollback (best of repeats, ms)")
    for column in ("model", "atoms", "tensors", "plan", "apply+rollback", "plan+apply+rollback", "forward", "fresh prune_"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["model"], str(r["atoms_removed"]), str(r["tensors_sliced"]), f"{r['plan_ms']:.1f}",
                      f"{r['apply_rollback_ms']:.1f}", f"{r['plan_apply_rollback_ms']:.1f}",
                      f"{r['forward_ms']:.1f}", f"{r['prune_ms']:.0f}")
    Console().print(table)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(__file__).parent / "results" / "apply_rollback.json"
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
