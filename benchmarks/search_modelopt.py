"""NVIDIA ModelOpt's FastNAS on the task of benchmarks/search.py: the outside anchor of the searches.

FastNAS (``modelopt.torch.prune``, mode "fastnas"; NVIDIA TensorRT Model Optimizer docs, "Pruning")
measures a sensitivity map (every searchable width of every layer alone, scored without
fine-tuning, BatchNorm recalibrated from its own cache of loader batches), then binary-searches
one degradation threshold so the subnet meets a FLOPs constraint. Here it runs on the very
``Task`` of search.py (same trained model per seed, same splits): its ``score_func`` is the
validation accuracy the torchslim searches maximise, its ``data_loader`` the training batches,
its constraint ``"flops": "<budget*100>%"`` of the unpruned model. The result is counted with
torchslim's MAC counter and scored exactly as search.py scores every method: test accuracy
right after pruning with BatchNorm recalibration, then after the same short fine-tune. As in
search.py's sensitivity rows, the map is built once per model and seed (at the first budget)
and reused for the others through FastNAS's checkpoint; each row's seconds and evaluations
include the map's.

Notes on ModelOpt (nvidia-modelopt 0.47.0, measured here):
- its BatchNorm-calibration cache holds 50 batches and is used only when full (otherwise it warns
  "modelopt data queue not filled" and scores with stale statistics), so the loader handed to it
  cycles the 17 training batches up to ``--loader-batches`` (default 50);
- widths move in steps of ``channel_divisor`` (default 32): on the digits CNN (32-64-128 convs)
  that leaves only conv2 {32, 64} and fc1 {32, 64} searchable, the smallest subnet has 50.5% of
  the FLOPs and FastNAS refuses every budget ("NOT all constraints can be satisfied"), so the
  digits CNN runs with divisor 8; ResNet-18 (64...512 channels) keeps the default 32;
- the last conv before AdaptiveAvgPool2d -> Flatten -> Linear is never searched (its width stays
  128 on the digits CNN, and ResNet-18's layer4 residual group stays 512 wide), so the tight
  budgets are met by cutting only what comes before: the CNN's smallest subnet has 8% of the
  FLOPs, ResNet-18's (divisor 32) 10.4%, so ResNet-18 at 0.1 is refused;
- the binary search ranks a subnet by the worst single-layer drop in the map and never scores the
  subnet itself, so what it predicts can be far from what the subnet measures: the JSON's
  "fastnas_details" has both validation accuracies for every pick, with the widths chosen.
A budget FastNAS refuses is listed under "refused" in the JSON with its message, not as a row.

Runs in its own virtual environment (ModelOpt pins packages the project does not need):
  python3 -m venv /tmp/venv-modelopt && /tmp/venv-modelopt/bin/pip install torch torchvision \
      nvidia-modelopt requests huggingface_hub torchprofile==0.0.4 scikit-learn rich safetensors pyyaml scipy \
      && /tmp/venv-modelopt/bin/pip install --no-deps -e .
  /tmp/venv-modelopt/bin/python benchmarks/search_modelopt.py [--models digits_cnn resnet18]
      [--budgets 0.5 0.2 0.1] [--seeds 0 1 2] [--channel-divisor digits_cnn=8 resnet18=32] [--quick]
Writes benchmarks/results/search_modelopt.json (rows keyed as search.py's, method "ModelOpt FastNAS").
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import modelopt.torch.prune as mtp
from modelopt.torch.prune.fastnas import BinarySearcher

import search  # benchmarks/search.py: the task, its scoring and its table
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.recovery import evaluate_accuracy, finetune

METHOD = "ModelOpt FastNAS"
DEFAULT_DIVISORS = {"digits_cnn": 8, "resnet18": 32}


class Clock:
    """Seconds and score evaluations spent building FastNAS's sensitivity map, and in total."""

    def __init__(self) -> None:
        self.map_seconds = 0.0
        self.evaluations = 0
        self.map_evaluations = 0

    def score_func(self, task: search.Task):
        def score(model: torch.nn.Module) -> float:
            self.evaluations += 1
            return evaluate_accuracy(model, task.val)
        return score


CLOCK: Clock | None = None
_build_map = BinarySearcher._build_sensitivity_map


def _timed_build_map(self, verbose: bool = False) -> None:
    """FastNAS's own map building, timed (a run reusing the map from its checkpoint spends ~0 s here)."""
    start, evals = time.perf_counter(), CLOCK.evaluations if CLOCK else 0
    _build_map(self, verbose)
    if CLOCK is not None:
        CLOCK.map_seconds += time.perf_counter() - start
        CLOCK.map_evaluations += CLOCK.evaluations - evals


BinarySearcher._build_sensitivity_map = _timed_build_map


def fastnas_mode(divisor: int) -> list:
    """Mode "fastnas" with its default ratios (0.05 ... 1.0) on a ``divisor``-channel grid."""
    conv, feat = {"*": {"channel_divisor": divisor}}, {"*": {"feature_divisor": divisor}}
    return [("fastnas", {"nn.Conv2d": conv, "nn.Linear": feat, "nn.BatchNorm2d": feat})]


def run_fastnas(task: search.Task, budget: float, divisor: int, checkpoint: str, loader_batches: int,
                verbose: bool) -> tuple:
    """(pruned copy, evaluations, seconds, ModelOpt's search state) for one budget."""
    global CLOCK
    CLOCK = clock = Clock()
    model = copy.deepcopy(task.model)
    loader = list(itertools.islice(itertools.cycle(task.train), loader_batches))
    start = time.perf_counter()
    model, state = mtp.prune(model, fastnas_mode(divisor), constraints={"flops": f"{100 * budget:g}%"},
                             dummy_input=task.example[0],
                             config={"data_loader": loader, "collect_func": lambda batch: batch[0],
                                     "max_iter_data_loader": loader_batches, "score_func": clock.score_func(task),
                                     "checkpoint": checkpoint, "verbose": verbose})
    return model, clock, time.perf_counter() - start, state


def run_task(name: str, seed: int, args, refused: list, details: list) -> list[dict]:
    task = search.Task(name, seed, args.train_epochs)
    divisor = args.channel_divisor[name]
    rows, first_map = [], None  # (seconds, evaluations) of the map, built at the first budget FastNAS accepts
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "fastnas_search.pth")
        for budget in args.budgets:
            try:
                model, clock, seconds, state = run_fastnas(task, budget, divisor, checkpoint, args.loader_batches,
                                                           args.verbose)
            except (ValueError, AssertionError) as error:
                refused.append({"model": name, "seed": seed, "budget": budget, "channel_divisor": divisor,
                                "error": f"{type(error).__name__}: {error}"})
                print(json.dumps(refused[-1]), flush=True)
                continue
            if first_map is None:
                first_map = (clock.map_seconds, clock.map_evaluations)
            reused = clock.map_evaluations == 0
            evaluations = clock.evaluations + (first_map[1] if reused else 0)
            seconds += first_map[0] if reused else 0.0
            macs = estimate_macs(DependencyGraph.build(model, task.example))
            val_accuracy = task.score(copy.deepcopy(model), task.val)
            row = {"model": name, "seed": seed, "budget": budget, "method": METHOD, "evaluations": evaluations,
                   "seconds": seconds, "original_accuracy": task.accuracy, "macs_ratio": macs / task.macs,
                   "params": sum(p.numel() for p in model.parameters()),
                   "accuracy_after_pruning": task.score(model, task.test)}
            finetune(model, task.train, epochs=args.finetune_epochs, lr=1e-3, progress=False)
            row["accuracy_after_finetune"] = evaluate_accuracy(model, task.test)
            rows.append(row)
            best = state["best"]
            details.append({"model": name, "seed": seed, "budget": budget, "channel_divisor": divisor,
                            "map_reused": reused, "map_seconds": first_map[0], "map_evaluations": first_map[1],
                            "modelopt_flops": best["constraints"]["flops"],
                            # FastNAS ranks a subnet by its worst single-layer drop in the map, never scoring it:
                            "predicted_val_accuracy": state["original_score"] + best["metric"],
                            "val_accuracy": val_accuracy,
                            "widths": {k: v for k, v in best["config"].items()
                                       if k.endswith(("out_channels", "out_features"))}})
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def divisors(pairs: list[str]) -> dict[str, int]:
    out = dict(DEFAULT_DIVISORS)
    for pair in pairs:
        model, _, value = pair.partition("=")
        if model not in out or not value.isdigit():
            raise SystemExit(f"--channel-divisor expects MODEL=N with MODEL in {sorted(out)}, got {pair!r}")
        out[model] = int(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits_cnn", "resnet18"], choices=["digits_cnn", "resnet18"])
    parser.add_argument("--budgets", nargs="*", type=float, default=[0.5, 0.2, 0.1])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--channel-divisor", nargs="*", default=[], help="MODEL=N, FastNAS's width step per model")
    parser.add_argument("--loader-batches", type=int, default=50,
                        help="training batches (cycled) handed to FastNAS; its BN cache needs 50")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="FastNAS's own profiling tables and progress bars")
    parser.add_argument("--quick", action="store_true", help="one seed, the CNN, budget 0.2, few epochs (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_modelopt.json")
    args = parser.parse_args()
    args.channel_divisor = divisors(args.channel_divisor)
    if args.quick:
        args.models, args.budgets, args.seeds = ["digits_cnn"], [0.2], [0]
        args.train_epochs, args.finetune_epochs = 3, 1
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    refused: list[dict] = []
    details: list[dict] = []
    for name in args.models:
        for seed in args.seeds:
            rows += run_task(name, seed, args, refused, details)
            write(args, rows, refused, details)  # after every model and seed, so a stopped run keeps its rows
    search.print_table(search.summarize(rows), args)
    print(f"wrote {args.out}")


def write(args, rows: list[dict], refused: list[dict], details: list[dict]) -> None:
    import modelopt

    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "nvidia-modelopt": modelopt.__version__}
    args.out.write_text(json.dumps({"machine": machine, "settings": {k: str(v) if isinstance(v, Path) else v
                                                                     for k, v in vars(args).items()},
                                    "summary": search.summarize(rows), "rows": rows, "refused": refused,
                                    "fastnas_details": details}, indent=2))


if __name__ == "__main__":
    main()
