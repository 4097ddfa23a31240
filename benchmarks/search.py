"""The automatic searches against uniform and global L1 on real data, where methods differ.

Tasks: the demo's digits CNN and a ResNet-18 adapted to 8x8 digits (3x3 stride-1 stem, no
max-pool, 1 input channel), trained per seed on scikit-learn's bundled digits; MACs budgets
0.5, 0.2 and 0.1; 3 seeds. Methods: uniform L1 (every group cut alike to the budget), global L1
ranking, SensitivitySearch (the analysis is measured once per model and seed; each budget is
then chosen from it, which takes seconds, plus one evaluation), NetAdaptSearch and
AnnealingSearch. The searches score candidates on a validation split of the training data
(accuracy after BatchNorm recalibration on training batches); the table reports the held-out
test split: right after pruning with BatchNorm recalibration (no fine-tune), then after the same
short fine-tune for every method. Writes benchmarks/results/search.json.
Usage: python benchmarks/search.py [--models digits_cnn resnet18] [--budgets 0.5 0.2 0.1]
       [--seeds 0 1 2] [--train-epochs 15] [--finetune-epochs 2] [--sa-evals 80] [--quick]
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
from torch import nn

import torchslim
from torchslim.demo import load_digits_tensors
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.models import create_model
from torchslim.recovery import evaluate_accuracy, finetune, recalibrate_bn_
from torchslim.search import AnnealingSearch, NetAdaptSearch, SensitivitySearch

METHODS = ("uniform L1", "global L1", "sensitivity", "NetAdapt", "SA")


def resnet18_digits() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build(name: str) -> nn.Module:
    return resnet18_digits() if name == "resnet18" else create_model("digits_cnn")


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int | None = None) -> list:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if seed is not None else \
        torch.arange(len(x))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


class Task:
    """One model trained on one seed's split, with the data every method shares."""

    def __init__(self, name: str, seed: int, train_epochs: int, calibration_batches: int = 4):
        x, y, x_test, y_test = load_digits_tensors(seed=seed)
        cut = int(0.8 * len(x))
        self.train = batches(x[:cut], y[:cut], 64, seed)
        self.val, self.test = batches(x[cut:], y[cut:], 256), batches(x_test, y_test, 256)
        self.calibration = self.train[:calibration_batches]
        self.example = (x[:1],)
        torch.manual_seed(seed)
        self.model = build(name)
        finetune(self.model, self.train, epochs=train_epochs, lr=2e-3, progress=False)
        self.model.eval()
        self.macs = estimate_macs(DependencyGraph.build(self.model, self.example))
        self.accuracy = evaluate_accuracy(self.model, self.test)

    def score(self, model: nn.Module, split: list) -> float:
        recalibrate_bn_(model, (b[0] for b in self.calibration))
        return evaluate_accuracy(model, split)

    def search_kwargs(self, budget: float, seed: int) -> dict:
        return dict(target_macs=budget, seed=seed, data=[b[0] for b in self.calibration], recalibrate_bn=True,
                    config=torchslim.PruneConfig(exact_only=True))


def pruned_by(method: str, task: Task, budget: float, seed: int, sensitivity, sa_evals: int,
              netadapt_cut: float) -> tuple:
    """(pruned copy, evaluations, seconds) for one method at one budget."""
    model = copy.deepcopy(task.model)
    evaluate = lambda m: evaluate_accuracy(m, task.val)  # noqa: E731 - recalibrated by the search first
    start = time.perf_counter()
    if method in ("uniform L1", "global L1"):
        config = torchslim.PruneConfig(target_macs=budget, exact_only=True, latency_aware=False,
                                       global_ranking=method == "global L1", verify=False)
        torchslim.prune_(model, task.example, config)
        return model, 0, time.perf_counter() - start
    kwargs = task.search_kwargs(budget, seed)
    if method == "sensitivity":
        analysis, seconds = sensitivity
        config = analysis.choose_for(task.model, task.example, target_macs=budget,
                                     config=torchslim.PruneConfig(exact_only=True))
        torchslim.prune_(model, task.example, config)
        return model, len(analysis.ratios) * len(analysis.curves) + 1, seconds + time.perf_counter() - start
    if method == "NetAdapt":
        search = NetAdaptSearch(model, task.example, evaluate, initial_cut=netadapt_cut, **kwargs)
    else:
        search = AnnealingSearch(model, task.example, evaluate, max_evals=sa_evals, **kwargs)
    result = search.run()
    result.apply_(model, task.example)
    return model, len(result.history), time.perf_counter() - start


def analyse(task: Task, seed: int):
    """The sensitivity analysis of ``task``'s model, once for every budget (with its seconds)."""
    start = time.perf_counter()
    search = SensitivitySearch(task.model, task.example, lambda m: evaluate_accuracy(m, task.val),
                               **task.search_kwargs(0.5, seed))
    return search.analyze(), time.perf_counter() - start


def run_task(name: str, seed: int, args) -> list[dict]:
    task = Task(name, seed, args.train_epochs)
    sensitivity = analyse(task, seed) if "sensitivity" in args.methods else None
    if sensitivity is not None and seed == args.seeds[0]:  # the curves the README shows
        sensitivity[0].plot(args.out.parent / f"search_sensitivity_{name}.png")
    rows = []
    for budget in args.budgets:
        for method in args.methods:
            model, evals, seconds = pruned_by(method, task, budget, seed, sensitivity, args.sa_evals,
                                              args.netadapt_cut)
            row = {"model": name, "seed": seed, "budget": budget, "method": method, "evaluations": evals,
                   "seconds": seconds, "original_accuracy": task.accuracy,
                   "macs_ratio": estimate_macs(DependencyGraph.build(model, task.example)) / task.macs,
                   "params": sum(p.numel() for p in model.parameters()),
                   "accuracy_after_pruning": task.score(model, task.test)}
            finetune(model, task.train, epochs=args.finetune_epochs, lr=1e-3, progress=False)
            row["accuracy_after_finetune"] = evaluate_accuracy(model, task.test)
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["model"], r["budget"], r["method"]) for r in rows},
                  key=lambda k: (k[0], -k[1], METHODS.index(k[2]) if k[2] in METHODS else len(METHODS)))
    out = []
    for model, budget, method in keys:
        mine = [r for r in rows if (r["model"], r["budget"], r["method"]) == (model, budget, method)]
        stat = lambda k, mine=mine: (statistics.mean(r[k] for r in mine), statistics.pstdev(r[k] for r in mine))  # noqa: E731
        out.append({"model": model, "budget": budget, "method": method, "seeds": len(mine),
                    **{k: stat(k) for k in ("accuracy_after_pruning", "accuracy_after_finetune", "macs_ratio",
                                            "seconds", "original_accuracy")},
                    "evaluations": statistics.mean(r["evaluations"] for r in mine)})
    return out


def print_table(summary: list[dict], args) -> None:
    table = Table(title=f"digits, accuracy on the test split (mean ± std over {len(args.seeds)} seeds): right after "
                        f"pruning + BN recalibration, then after {args.finetune_epochs} fine-tune epoch(s)")
    for col in ("model", "MACs budget", "method", "MACs", "acc. right after", "acc. after fine-tune", "evals", "s"):
        table.add_column(col, justify="right")
    pm = lambda v: f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"  # noqa: E731
    for s in summary:
        table.add_row(s["model"], f"{s['budget']:g}", s["method"], f"{s['macs_ratio'][0]:.3f}",
                      pm(s["accuracy_after_pruning"]), pm(s["accuracy_after_finetune"]), f"{s['evaluations']:.0f}",
                      f"{s['seconds'][0]:.1f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits_cnn", "resnet18"], choices=["digits_cnn", "resnet18"])
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.5, 0.2, 0.1])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--sa-evals", type=int, default=80)
    parser.add_argument("--netadapt-cut", type=float, default=0.05, help="NetAdapt's first cut (share of the MACs)")
    parser.add_argument("--quick", action="store_true", help="one seed, the CNN, budget 0.2, few epochs (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search.json")
    args = parser.parse_args()
    if args.quick:
        args.models, args.budgets, args.seeds = ["digits_cnn"], [0.2], [0]
        args.train_epochs, args.finetune_epochs, args.sa_evals = 3, 1, 10
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows: list[dict] = []
    for name in args.models:
        for seed in args.seeds:
            rows += run_task(name, seed, args)
            write(args, rows)  # after every model and seed: a long run keeps what it measured
    print_table(summarize(rows), args)
    print(f"wrote {args.out}")


def write(args, rows: list[dict]) -> None:
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "summary": summarize(rows),
                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
