"""The automatic searches against uniform and global L1 on real data, where methods differ.

Tasks: the demo's digits CNN and a ResNet-18 adapted to 8x8 digits (3x3 stride-1 stem, no
max-pool, 1 input channel), trained per seed on scikit-learn's bundled digits; MACs budgets
0.5, 0.2 and 0.1; 3 seeds. Methods: uniform L1 (every group cut alike to the budget), global L1
ranking, SensitivitySearch (the analysis is measured once per model and seed; each budget is
then chosen from it, which takes seconds, plus one evaluation), NetAdaptSearch,
AnnealingSearch, AMCSearch (120 episodes, 40 of them random; "AMC-12": 12 episodes, 3
random, the budget NNI's AMC was tried with) and AutoCompress (2 rounds of annealing, each followed by ADMM training of
``--admm-epochs`` epochs at the round's winner and the hard prune: it trains before its
"right after" score, the others do not; the row says how many epochs). The searches score candidates on a validation split of the training data
(accuracy after BatchNorm recalibration on training batches); the table reports the held-out
test split: right after pruning with BatchNorm recalibration (no fine-tune), then after the same
short fine-tune for every method. Writes benchmarks/results/search.json.
Usage: python benchmarks/search.py [--models digits_cnn resnet18] [--budgets 0.5 0.2 0.1]
       [--seeds 0 1 2] [--methods ...] [--train-epochs 15] [--finetune-epochs 2] [--sa-evals 80]
       [--admm-epochs 2] [--out results/search.json] [--quick]
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
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import torchslim
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.recovery import evaluate_accuracy
from _digits_task import Task, batches, build  # noqa: F401 - batches and build: imported from here by slimmable.py
from torchslim.search import AMCSearch, AnnealingSearch, AutoCompress, NetAdaptSearch, SensitivitySearch, admm_trainer

METHODS = ("uniform L1", "global L1", "sensitivity", "NetAdapt", "SA", "AutoCompress", "AMC", "AMC-12")


def pruned_by(method: str, task: Task, budget: float, seed: int, sensitivity, sa_evals: int,
              netadapt_cut: float, admm_epochs: int = 2) -> tuple:
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
    if method == "AutoCompress":
        train = admm_trainer(task.train, F.cross_entropy, epochs=admm_epochs, lr=1e-3)
        compressed = AutoCompress(model, task.example, evaluate, train, rounds=2, evals_per_round=max(1, sa_evals // 2),
                                  rho=0.01, rho_growth=1.3,
                                  update_every=6, **kwargs).run()
        return compressed.model, len(compressed.history), time.perf_counter() - start
    if method in ("AMC", "AMC-12"):  # AMC-12: the episode budget NNI's AMC was run with
        episodes, warmup = (12, 3) if method == "AMC-12" else (120, 40)
        search = AMCSearch(model, task.example, evaluate, episodes=episodes, warmup=warmup, **kwargs)
        result = search.run()
        result.apply_(model, task.example)
        return model, len(result.history), time.perf_counter() - start
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
                                              args.netadapt_cut, args.admm_epochs)
            trained = 2 * args.admm_epochs if method == "AutoCompress" else 0
            row = {"model": name, "seed": seed, "budget": budget, "method": method, "evaluations": evals,
                   "epochs_before_score": trained,
                   "seconds": seconds, "original_accuracy": task.accuracy,
                   "macs_ratio": estimate_macs(DependencyGraph.build(model, task.example)) / task.macs}
            rows.append(task.finish(model, row, args.finetune_epochs))
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
                    "evaluations": statistics.mean(r["evaluations"] for r in mine),
                    "epochs_before_score": max(r.get("epochs_before_score", 0) for r in mine)})
    return out


def print_table(summary: list[dict], args) -> None:
    table = Table(title=f"digits, accuracy on the test split (mean ± std over {len(args.seeds)} seeds): right after "
                        f"pruning + BN recalibration, then after {args.finetune_epochs} fine-tune epoch(s)")
    for col in ("model", "MACs budget", "method", "MACs", "acc. right after", "acc. after fine-tune", "evals", "s",
                "epochs before"):
        table.add_column(col, justify="right")
    pm = lambda v: f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"  # noqa: E731
    for s in summary:
        table.add_row(s["model"], f"{s['budget']:g}", s["method"], f"{s['macs_ratio'][0]:.3f}",
                      pm(s["accuracy_after_pruning"]), pm(s["accuracy_after_finetune"]), f"{s['evaluations']:.0f}",
                      f"{s['seconds'][0]:.1f}", str(s["epochs_before_score"]))
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
    parser.add_argument("--admm-epochs", type=int, default=2, help="AutoCompress: ADMM epochs per round (2 rounds)")
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
