"""Depth against width: ResNet-18 on digits with k of its residual blocks dropped (ranked by
block influence, or chosen at random) against channels pruned to the same MACs.

For each seed a ResNet-18 adapted to 8x8 digits is trained; then, per k = 1..3 droppable blocks
(layer1.1 ... layer4.1), four models at the same MACs: the k blocks of lowest block influence
dropped (``torchslim.prune_depth_``), k random droppable blocks dropped, channels pruned to the
depth model's MACs (``prune_``, L1, exact), and half the depth cut taken by blocks and half by
channels. Each is scored on the test split right after pruning (BatchNorm recalibrated) and
after the same short fine-tune, and timed against the original in turn (batch 1, 1 thread).

    python benchmarks/depth.py                 # 3 seeds, k = 1, 2, 3 (about 10 minutes here)
    python benchmarks/depth.py --quick         # one seed, k = 2, short training (a smoke run)
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from _digits_task import Task

import torchslim
from torchslim.latency import measure_in_turn
from torchslim.pruning import drop_blocks_, droppable_blocks

METHODS = ("depth (block influence)", "depth (random blocks)", "width (L1, same MACs)", "half depth + half width")


def macs_of(model: torch.nn.Module, example) -> int:
    return torchslim.analyze(model, example, latency=False).total_macs


def variants(task: Task, k: int, seed: int) -> dict[str, tuple[torch.nn.Module, list[str]]]:
    """The four pruned models at (about) the MACs of k dropped blocks, with the blocks each dropped."""
    example = task.example
    depth = copy.deepcopy(task.model)
    result = torchslim.prune_depth_(depth, example, k, data=task.calibration)
    target = result.macs_ratio
    random_blocks = copy.deepcopy(task.model)
    chosen = random.Random(seed).sample(droppable_blocks(random_blocks, example), k)
    drop_blocks_(random_blocks, chosen)
    width = copy.deepcopy(task.model)
    torchslim.prune_(width, example, torchslim.PruneConfig(target_macs=target, exact_only=True, latency_aware=False))
    mixed = copy.deepcopy(task.model)
    half = max(1, k // 2) if k > 1 else 1
    mixed_depth = torchslim.prune_depth_(mixed, example, half, data=task.calibration)
    if mixed_depth.macs_ratio > target + 1e-9:
        torchslim.prune_(mixed, example, torchslim.PruneConfig(target_macs=target / mixed_depth.macs_ratio,
                                                               exact_only=True, latency_aware=False))
    return dict(zip(METHODS, ((depth, result.dropped), (random_blocks, chosen), (width, []),
                              (mixed, mixed_depth.dropped))))


def run_seed(seed: int, ks: list[int], args: argparse.Namespace) -> list[dict]:
    task = Task("resnet18", seed, args.train_epochs)
    base_macs = macs_of(task.model, task.example)
    original_accuracy = task.score(copy.deepcopy(task.model), task.test)  # recalibrated like the pruned ones
    rows = []
    for k in ks:
        models = variants(task, k, seed)
        latency = measure_in_turn({"original": task.model, **{m: v[0] for m, v in models.items()}}, task.example,
                                  threads=1, rounds=3, repeats=30)
        for method, (model, dropped) in models.items():
            row = {"seed": seed, "k": k, "method": method, "dropped": dropped,
                   "macs_ratio": macs_of(model, task.example) / base_macs,
                   "latency_ratio": latency[method].median_ms / latency["original"].median_ms,
                   "original_accuracy": original_accuracy}
            rows.append(task.finish(model, row, args.finetune_epochs))
    return rows


def summarise(rows: list[dict], seeds: list[int]) -> Table:
    table = Table(title=f"ResNet-18 on digits, test accuracy (mean ± std over {len(seeds)} seed(s)) right after "
                        "pruning (BN recalibrated) / after fine-tuning; MACs and latency vs the original")
    originals = {r["seed"]: r["original_accuracy"] for r in rows}
    table.caption = f"original (BN recalibrated): {statistics.mean(originals.values()):.3f}"
    for column in ("k blocks", "method", "MACs", "latency", "after pruning", "after fine-tune"):
        table.add_column(column, justify="right" if column not in ("method",) else "left")

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"

    for k in sorted({r["k"] for r in rows}):
        for method in METHODS:
            chosen = [r for r in rows if r["k"] == k and r["method"] == method]
            table.add_row(str(k), method, f"{statistics.mean(r['macs_ratio'] for r in chosen):.3f}",
                          f"{statistics.mean(r['latency_ratio'] for r in chosen):.3f}",
                          spread([r["accuracy_after_pruning"] for r in chosen]),
                          spread([r["accuracy_after_finetune"] for r in chosen]))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--blocks", nargs="*", type=int, default=[1, 2, 3], help="numbers of blocks dropped")
    parser.add_argument("--train-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one seed, k = 2, 2 training epochs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "depth.json")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.blocks, args.train_epochs = [0], [2], 2
    torch.set_num_threads(1)
    rows = [row for seed in args.seeds for row in run_seed(seed, args.blocks, args)]
    Console().print(summarise(rows, args.seeds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "train_epochs": args.train_epochs,
                                    "finetune_epochs": args.finetune_epochs, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
