"""Measured speed at equal MACs: torchslim (latency-aware) vs Torch-Pruning 1.6.1, same run.

For each model and MACs level (75/50/25% of the original) prints latency ratio next to
MACs ratio on PyTorch eager and ONNX Runtime (CPU, fixed threads) -- torchslim prunes once per
runtime, with its latency table measured on that runtime and the fastest-measured of its candidate
rankings kept (``PruneResult.latency_candidates``) -- and writes
benchmarks/results/latency.json with the machine described.
Usage: python benchmarks/latency.py [--models resnet50 mobilenet_v2 vit_b_16 modnet] [--levels 0.75 0.5 0.25]
       [--batch 1] [--serve-batch 8] [--merge] [--target-latency 0.5]
       (--levels with no value and --target-latency 0: only the per-op cost rows)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

import torchslim
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim._timing import keep_freed_memory
from torchslim.latency import measure_in_turn


def build(name: str, batch: int = 1):
    if name == "modnet":
        from torchslim.models import create_model

        return create_model("modnet").eval(), (torch.randn(batch, 3, 256, 256), False)
    return getattr(torchvision.models, name)().eval(), (torch.randn(batch, 3, 224, 224),)


def macs(model, inputs) -> int:
    return estimate_macs(DependencyGraph.build(model, inputs))


def ours(model, inputs, level: float, runtime: str = "torch"):
    """Pruned for the runtime it will ship on: the latency table is measured there."""
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    # no layer loses more than 3/4 of its channels: the pruned model must stay trainable, not
    # only fast (uncapped, latency-aware ranking would cut MobileNetV2's stem to 2 channels)
    config = torchslim.PruneConfig(target_macs=level, latency_aware=True, round_to="latency", latency_runtime=runtime,
                                   max_sparsity_per_layer=MAX_SPARSITY, verify=False)
    result = torchslim.prune_(pruned, inputs, config)
    chosen = next((t for t in result.latency_candidates if t["chosen"]), {})
    return pruned, time.perf_counter() - start, {"candidates": result.latency_candidates,
                                                 "chosen": f"{chosen.get('ranking')}/{chosen.get('round_to')}"}


def torch_pruning_at(model, inputs, target_macs: int):
    """Torch-Pruning's magnitude pruner, its ratio bisected until our MAC count meets the target."""
    import torch_pruning as tp

    lo, hi, best = 0.0, 0.95, None
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    for _ in range(7):
        mid = (lo + hi) / 2
        candidate = copy.deepcopy(model)
        ignored = [m for m in candidate.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000] if head else []
        pruner = tp.pruner.MagnitudePruner(candidate, inputs[0] if len(inputs) == 1 else inputs,
                                           importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=mid,
                                           ignored_layers=ignored, round_to=8)
        pruner.step()
        if macs(candidate, inputs) <= target_macs:
            best, hi = candidate, mid
        else:
            lo = mid
    return best


ROUNDS = 3
MAX_SPARSITY = 0.75


def interleaved(models: dict, inputs, runtime: str, threads: int) -> dict:
    """Min over rounds of the median latency, models measured in turn each round, so that load
    from other processes hits all of them alike and the least-disturbed round counts."""
    stats = measure_in_turn(models, inputs, runtime=runtime, threads=threads, rounds=ROUNDS, warmup=3, repeats=15)
    return {name: s.median_ms for name, s in stats.items()}


def latency_target_row(name: str, model, inputs, target: float, threads: int) -> dict:
    """``target_latency=target`` on each runtime: the measured ratio should be within 10% of it.

    Widths in multiples of 8: ONNX Runtime's NCHWc convolutions want them (MobileNetV2 at
    round_to=1 reached half its ORT latency only at 0.12 of its MACs, at round_to=8 at 0.41)."""
    row = {"model": name, "target_latency": target}
    for runtime in ("torch", "onnxruntime"):
        pruned = copy.deepcopy(model)
        result = torchslim.prune_(pruned, inputs, torchslim.PruneConfig(
            target_latency=target, latency_runtime=runtime, latency_threads=threads, round_to=8,
            max_sparsity_per_layer=MAX_SPARSITY, verify=False))
        measured = interleaved({"original": model, "pruned": pruned}, inputs, runtime, threads)
        ratio = measured["pruned"] / measured["original"]
        row[runtime] = {"measured_ratio": ratio, "predicted_ratio": result.latency_predicted_ms / result.latency_before_ms,
                        "macs_ratio": result.macs_after / result.macs_before, "within_10pct": abs(ratio - target) <= 0.1 * target,
                        "calibration": result.latency_calibration}
    return row


TINY_SIDE = 32  # the smallest input every CNN here takes (MODNet: a multiple of 32)


def overhead_row(name: str, model, inputs, full_macs: int, threads: int) -> dict | None:
    """Each runtime's per-op cost: latency is fitted as ``o + k * MACs`` through the model at its
    input (``full_macs``) and at 32x32 (each the best of rounds), and ``o`` is what no channel
    pruning removes. If every
    other millisecond fell with the MACs, pruning to half the MACs would give a latency ratio /
    MACs ratio of ``(o/T + (1 - o/T) / 2) / (1/2)``; a ranking that cuts where the time is per
    MAC does better, one that cuts compute-bound layers worse. None for ViT (its position
    embedding fixes the input size)."""
    if name.startswith("vit"):
        return None
    batch = inputs[0].shape[0]
    tiny = (torch.randn(batch, 3, TINY_SIDE, TINY_SIDE),) + tuple(inputs[1:])
    tiny_macs = macs(model, tiny)
    row = {"model": name, "tiny_input": [batch, 3, TINY_SIDE, TINY_SIDE], "tiny_macs_fraction": tiny_macs / full_macs}
    for runtime in ("torch", "onnxruntime"):
        full = interleaved({"model": model}, inputs, runtime, threads)["model"]
        small = interleaved({"model": model}, tiny, runtime, threads)["model"]
        overhead = max((small * full_macs - full * tiny_macs) / (full_macs - tiny_macs), 0.0)
        share = overhead / full
        row[runtime] = {"full_ms": full, "tiny_ms": small, "overhead_ms": overhead, "overhead_share": share,
                        "uniform_per_macs_at_half": (share + (1 - share) / 2) / 0.5}
    return row


def merged(previous: dict, rows: list[dict], targets: list[dict]) -> tuple[list[dict], list[dict]]:
    """This run's rows plus the previous file's rows for (model, level) pairs and targets it did
    not measure, in model and level order."""
    done = {(r["model"], r["level"]) for r in rows}
    done_targets = {(t["model"], t["target_latency"]) for t in targets}
    rows = rows + [r for r in previous.get("rows", []) if (r["model"], r["level"]) not in done]
    targets = targets + [t for t in previous.get("latency_targets", [])
                         if (t["model"], t["target_latency"]) not in done_targets]
    order = {m: i for i, m in enumerate(("resnet50", "mobilenet_v2", "vit_b_16", "modnet"))}
    rows.sort(key=lambda r: (order.get(r["model"], 99), -r["level"]))
    targets.sort(key=lambda t: order.get(t["model"], 99))
    return rows, targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2", "vit_b_16", "modnet"])
    parser.add_argument("--levels", nargs="*", type=float, default=[0.75, 0.5, 0.25])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1,
                        help="batch size of the inputs pruned for and timed (per-op cost weighs less at larger batches)")
    parser.add_argument("--serve-batch", type=int, default=0,
                        help="also time every model at this batch size (pruned at --batch, served at another)")
    parser.add_argument("--target-latency", type=float, default=0.5, help="also prune to this latency fraction (0: skip)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency.json")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc returning freed memory to the OS (each forward then page-faults its activations)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of --out for the (model, level) pairs and latency targets not rerun")
    args = parser.parse_args()
    steady = False if args.system_malloc else keep_freed_memory()
    console = Console()
    rows, targets, overheads = [], [], []
    for name in args.models:
        model, inputs = build(name, args.batch)
        base_macs = macs(model, inputs)
        overhead = overhead_row(name, model, inputs, base_macs, args.threads)
        if overhead is not None:
            overheads.append(overhead)
            console.print(overhead)
        for level in args.levels:
            pruned, seconds, choice = ours(model, inputs, level)
            pruned_ort, _, choice_ort = ours(model, inputs, level, "onnxruntime")
            row = {"model": name, "level": level, "prune_seconds": seconds,
                   "ranking_chosen": {"torch": choice, "onnxruntime": choice_ort}}
            contenders = {"original": model, "torchslim": pruned, "torchslim_ort": pruned_ort}
            try:
                theirs = torch_pruning_at(model, inputs, macs(pruned, inputs))
                if theirs is None:
                    row["torch_pruning"] = {"error": "no ratio met the MACs"}
                else:
                    contenders["torch_pruning"] = theirs
            except Exception as exc:  # noqa: BLE001 - the anchor failing is a result
                row["torch_pruning"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            times = {rt: interleaved(contenders, inputs, rt, args.threads) for rt in ("torch", "onnxruntime")}
            served = {}
            if args.serve_batch:
                batch_inputs = (inputs[0].repeat(args.serve_batch, 1, 1, 1),) + tuple(inputs[1:])
                served = {rt: interleaved(contenders, batch_inputs, rt, args.threads) for rt in ("torch", "onnxruntime")}
            for label, net in contenders.items():
                if label == "original":
                    continue
                entry = {"macs_ratio": macs(net, inputs) / base_macs}
                for rt, measured in times.items():
                    entry[f"{rt}_ms"] = measured[label]
                    entry[f"{rt}_ratio"] = measured[label] / measured["original"]
                    entry[f"{rt}_per_macs"] = entry[f"{rt}_ratio"] / entry["macs_ratio"]
                for rt, measured in served.items():
                    ratio = measured[label] / measured["original"]
                    entry[f"{rt}_per_macs_at_batch{args.serve_batch}"] = ratio / entry["macs_ratio"]
                row[label] = entry
            row["original_ms"] = {rt: times[rt]["original"] for rt in times}
            if served:
                row[f"original_ms_at_batch{args.serve_batch}"] = {rt: served[rt]["original"] for rt in served}
            row["measured_at"] = time.strftime("%Y-%m-%d %H:%M")  # each row times its own original
            rows.append(row)
            console.print(row)
        if args.target_latency:
            targets.append(latency_target_row(name, model, inputs, args.target_latency, args.threads))
            targets[-1]["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
            console.print(targets[-1])
    if args.merge and args.out.exists():
        previous = json.loads(args.out.read_text())
        rows, targets = merged(previous, rows, targets)
        overheads += [o for o in previous.get("per_op_overhead", []) if o["model"] not in {r["model"] for r in overheads}]
    table = Table(title=f"latency ratio vs MACs ratio ({args.threads} thread, batch {args.batch})")
    # torch columns: pruned with the torch table; ORT columns: pruned with the ONNX Runtime table
    for col in ("model", "target", "MACs", "torch", "torch/MACs", "ORT MACs", "ORT", "ORT/MACs", "TP MACs",
                "TP torch", "TP ORT", "kept ranking torch / ORT"):
        table.add_column(col, justify="right")
    for r in rows:
        o, q, t = r["torchslim"], r["torchslim_ort"], r.get("torch_pruning", {})
        f = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
        table.add_row(r["model"], f"{r['level']:.2f}", f(o, "macs_ratio"), f(o, "torch_ratio"), f(o, "torch_per_macs"),
                      f(q, "macs_ratio"), f(q, "onnxruntime_ratio"), f(q, "onnxruntime_per_macs"), f(t, "macs_ratio"),
                      f(t, "torch_ratio"), f(t, "onnxruntime_ratio"),
                      f"{r['ranking_chosen']['torch']['chosen']} / {r['ranking_chosen']['onnxruntime']['chosen']}")
    console.print(table)
    if overheads:
        floor = Table(title="per-op cost (latency = o + k * MACs, fitted at the input and at 32x32)")
        for col in ("model", "torch o (ms)", "torch o / T", "torch uniform @50%", "ORT o (ms)", "ORT o / T", "ORT uniform @50%"):
            floor.add_column(col, justify="right")
        for o in overheads:
            cells = [f"{o[rt][k]:.{d}f}" for rt in ("torch", "onnxruntime")
                     for k, d in (("overhead_ms", 2), ("overhead_share", 2), ("uniform_per_macs_at_half", 2))]
            floor.add_row(o["model"], *cells)
        console.print(floor)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpu": platform.processor(),
                                                "cores": os.cpu_count(), "threads": args.threads, "batch": args.batch,
                                                "torch": torch.__version__,
                                                "freed_memory_kept_in_process": steady}, "rows": rows,
                                    "latency_targets": targets, "per_op_overhead": overheads}, indent=2))


if __name__ == "__main__":
    main()
