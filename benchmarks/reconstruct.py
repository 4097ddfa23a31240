"""Accuracy without retraining: channel choice (L1 vs ThiNet's data-aware greedy) with and
without least-squares reconstruction, right after pruning and after the same short fine-tune.

Task: benchmarks/_digits_task.py (the demo's digits CNN and a ResNet-18 adapted to 8x8 digits,
trained per seed). For each MACs budget (0.5 and 0.25 by default) and criterion (l1, thinet)
the model is pruned (``PruneConfig(target_macs=..., exact_only=True)``), then optionally
re-fitted by ``torchslim.reconstruct_`` on ``--calibration-batches`` training batches (64 rows
each), BatchNorm recalibrated on the task's 4 calibration batches, scored on the test split
("right after"), fine-tuned ``--finetune-epochs`` epochs and scored again. Calibration (the
ThiNet statistics, the Gram matrices) and reconstruction seconds are reported. A scale check
follows: torchvision's ResNet-50 (random weights, 224x224 random inputs) at 50% of the MACs,
the relative error of its logits to the unpruned model with and without reconstruction.
Writes benchmarks/results/reconstruct.json.
Usage: python benchmarks/reconstruct.py [--models digits_cnn resnet18] [--budgets 0.5 0.25]
       [--seeds 0 1 2] [--calibration-batches 16] [--finetune-epochs 2] [--no-resnet50] [--quick]
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
from torchslim.recovery import evaluate_accuracy, finetune

from _digits_task import Task

CRITERIA = ("l1", "thinet")


def pruned(task: Task, budget: float, criterion: str, reconstruct: bool, calibration: list) -> tuple:
    """(pruned and possibly re-fitted copy of the task's model, seconds of pruning, of reconstruction)."""
    model = copy.deepcopy(task.model).eval()
    start = time.perf_counter()
    config = torchslim.PruneConfig(target_macs=budget, exact_only=True, criterion=criterion, latency_aware=False,
                                   verify=False)
    torchslim.prune_(model, task.example, config, data=calibration if criterion == "thinet" else None)
    prune_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if reconstruct:
        torchslim.reconstruct_(model, task.model, calibration)
    return model, prune_seconds, time.perf_counter() - start


def run_task(name: str, seed: int, args) -> list[dict]:
    task = Task(name, seed, args.train_epochs)
    calibration = task.train[:args.calibration_batches]
    rows = []
    for budget in args.budgets:
        for criterion in CRITERIA:
            for reconstruct in (False, True):
                model, prune_s, reconstruct_s = pruned(task, budget, criterion, reconstruct, calibration)
                row = {"model": name, "seed": seed, "budget": budget, "criterion": criterion,
                       "reconstruct": reconstruct, "original_accuracy": task.accuracy, "prune_seconds": prune_s,
                       "reconstruct_seconds": reconstruct_s, "accuracy_after_pruning": task.score(model, task.test)}
                finetune(model, task.train, epochs=args.finetune_epochs, lr=1e-3, progress=False)
                row["accuracy_after_finetune"] = evaluate_accuracy(model, task.test)
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


@torch.no_grad()
def resnet50_scale_check(batches: int) -> dict:
    """ResNet-50 (random weights) at 50% MACs: logits' relative error with / without reconstruction."""
    torch.manual_seed(0)
    original = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    calibration = [torch.randn(4, 3, 224, 224) for _ in range(batches)]
    held_out = torch.randn(4, 3, 224, 224)
    reference = original(held_out)
    model = copy.deepcopy(original)
    start = time.perf_counter()
    torchslim.prune_(model, x, torchslim.PruneConfig(target_macs=0.5, exact_only=True, latency_aware=False,
                                                    verify=False))
    prune_seconds = time.perf_counter() - start

    def error(m) -> float:
        return float((m(held_out) - reference).norm() / reference.norm())

    before = error(model)
    start = time.perf_counter()
    report = torchslim.reconstruct_(model, original, calibration)
    return {"model": "resnet50 (random weights)", "budget": 0.5, "calibration_rows": 4 * batches,
            "relative_logit_error_without": before, "relative_logit_error_with": error(model),
            "prune_seconds": prune_seconds, "reconstruct_seconds": time.perf_counter() - start,
            "layers_refit": len(report.errors), "layers_skipped": len(report.skipped)}


def summarize(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["model"], r["budget"], r["criterion"], r["reconstruct"]) for r in rows},
                  key=lambda k: (k[0], -k[1], CRITERIA.index(k[2]), k[3]))
    out = []
    for key in keys:
        mine = [r for r in rows if (r["model"], r["budget"], r["criterion"], r["reconstruct"]) == key]
        stat = lambda k, mine=mine: (statistics.mean(r[k] for r in mine), statistics.pstdev(r[k] for r in mine))  # noqa: E731
        out.append({"model": key[0], "budget": key[1], "criterion": key[2], "reconstruct": key[3], "seeds": len(mine),
                    **{k: stat(k) for k in ("accuracy_after_pruning", "accuracy_after_finetune", "original_accuracy",
                                            "prune_seconds", "reconstruct_seconds")}})
    return out


def print_table(summary: list[dict], scale: dict | None, args) -> None:
    table = Table(title=f"digits, test accuracy % (mean ± std over {len(args.seeds)} seeds): right after pruning + "
                        f"BN recalibration, then after {args.finetune_epochs} fine-tune epoch(s)")
    for col in ("model", "MACs", "criterion", "reconstruct", "right after", "after fine-tune", "original",
                "prune s", "reconstruct s"):
        table.add_column(col, justify="right")
    pm = lambda v: f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"  # noqa: E731
    for s in summary:
        table.add_row(s["model"], f"{s['budget']:g}", s["criterion"], "yes" if s["reconstruct"] else "no",
                      pm(s["accuracy_after_pruning"]), pm(s["accuracy_after_finetune"]),
                      f"{100 * s['original_accuracy'][0]:.1f}", f"{s['prune_seconds'][0]:.2f}",
                      f"{s['reconstruct_seconds'][0]:.2f}")
    console = Console()
    console.print(table)
    if scale is not None:
        console.print(f"ResNet-50 (random weights) at 50% MACs: relative logit error "
                      f"{scale['relative_logit_error_without']:.3f} -> {scale['relative_logit_error_with']:.3f} with "
                      f"reconstruction ({scale['layers_refit']} layers re-fitted on {scale['calibration_rows']} images "
                      f"in {scale['reconstruct_seconds']:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits_cnn", "resnet18"], choices=["digits_cnn", "resnet18"])
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.5, 0.25])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--resnet50-batches", type=int, default=8, help="calibration batches of 4 images")
    parser.add_argument("--no-resnet50", action="store_true", help="skip the ResNet-50 scale check")
    parser.add_argument("--quick", action="store_true", help="the CNN, one seed, budget 0.25, few epochs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reconstruct.json")
    args = parser.parse_args()
    if args.quick:
        args.models, args.budgets, args.seeds, args.train_epochs, args.finetune_epochs = ["digits_cnn"], [0.25], [0], 3, 1
        args.no_resnet50 = True
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows: list[dict] = []
    scale = None
    for name in args.models:
        for seed in args.seeds:
            rows += run_task(name, seed, args)
            write(args, rows, scale)
    if not args.no_resnet50:
        scale = resnet50_scale_check(args.resnet50_batches)
        write(args, rows, scale)
    print_table(summarize(rows), scale, args)
    print(f"wrote {args.out}")


def write(args, rows: list[dict], scale: dict | None) -> None:
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "summary": summarize(rows),
                                    "rows": rows, "resnet50": scale}, indent=2))


if __name__ == "__main__":
    main()
