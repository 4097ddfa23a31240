"""``torchslim bench MODEL --input ... [--runtime torch|onnxruntime]``: original vs pruned,
params, MACs, size and measured latency with its spread."""
from __future__ import annotations

import argparse
import copy
import io
import json
from pathlib import Path

import torch

from torchslim.cli._common import (add_model_arguments, add_pruning_arguments, check_pruning_flags, config_from_args,
                                   model_and_inputs, pruning_data)
from torchslim.cli._errors import CliError


ROUNDS = 3


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="compare an original and a pruned model: params, MACs, size, latency",
                       description="Prune a copy of MODEL as 'torchslim prune' would (same flags) and compare it with "
                                   "the original: params, MACs, size, and latency timed in turn over "
                                   f"{ROUNDS} rounds (best round kept, p10-p90 shown).")
    add_model_arguments(p)
    add_pruning_arguments(p)
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="runtime both models are timed on (default torch; onnxruntime exports them first)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per round (default 30)")
    p.add_argument("--json", type=Path, help="write the comparison as JSON")
    p.add_argument("--system-malloc", action="store_true",
                   help="let glibc return freed memory to the OS between runs (by default it is kept in the "
                        "process, as jemalloc/tcmalloc deployments do: page faults otherwise dominate on VMs)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torchslim
    from torchslim._timing import keep_freed_memory
    from torchslim.graph import DependencyGraph
    from torchslim.graph.macs import estimate_macs
    from torchslim.latency import measure_in_turn

    check_pruning_flags(args)
    if args.repeats < 1:
        raise CliError(f"--repeats must be >= 1, got {args.repeats}")
    if not args.system_malloc:
        keep_freed_memory()
    model, inputs = model_and_inputs(args)
    config = config_from_args(args, model)
    data = pruning_data(args, model, config)
    pruned = copy.deepcopy(model)
    try:
        torchslim.prune_(pruned, inputs, config, **data)
    except (ValueError, torchslim.PruningError) as exc:
        raise CliError(str(exc)) from None
    nets = {"original": model, "pruned": pruned}
    # measured in turn, best of rounds: neither model gets the cold first measurement alone
    latency = measure_in_turn(nets, inputs, runtime=args.runtime, threads=args.threads, rounds=ROUNDS, warmup=5,
                              repeats=args.repeats)
    rows = {}
    for label, net in nets.items():
        stats = latency[label]
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        rows[label] = {"params": sum(p.numel() for p in net.parameters()),
                       "macs": estimate_macs(DependencyGraph.build(net, inputs)), "size_bytes": buffer.tell(),
                       "latency_ms": stats.median_ms, "latency_p10_ms": stats.p10_ms, "latency_p90_ms": stats.p90_ms,
                       "latency_round_medians_ms": stats.round_medians_ms}
    result = {"runtime": args.runtime, "threads": args.threads, **rows}
    _print(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _print(result: dict) -> None:
    from rich.table import Table

    from torchslim.cli._common import make_console

    o, p = result["original"], result["pruned"]
    table = Table(title=f"{result['runtime']}, {result['threads']} thread(s)")
    for col in ("", "original", "pruned", "pruned / original"):
        table.add_column(col, justify="right")
    for key in ("params", "macs", "size_bytes"):
        table.add_row(key, f"{o[key]:,}", f"{p[key]:,}", f"{p[key] / o[key]:.3f}")
    spread = lambda r: f"{r['latency_ms']:.2f} ({r['latency_p10_ms']:.2f}-{r['latency_p90_ms']:.2f})"  # noqa: E731
    table.add_row("latency ms (p10-p90)", spread(o), spread(p), f"{p['latency_ms'] / o['latency_ms']:.3f}")
    console = make_console()
    console.print(table)
    rounds = lambda r: "/".join(f"{m:.2f}" for m in r["latency_round_medians_ms"])  # noqa: E731
    console.print(f"latency timed in turn, best of {len(o['latency_round_medians_ms'])} rounds (round medians: "
                  f"original {rounds(o)}, pruned {rounds(p)} ms)", soft_wrap=True, highlight=False)
