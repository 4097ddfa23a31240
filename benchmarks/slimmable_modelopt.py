"""NVIDIA ModelOpt's AutoNAS on the task of benchmarks/slimmable.py: the outside anchor of US-Net + AutoSlim.

AutoNAS (``modelopt.torch.nas``, mode "autonas"; NVIDIA TensorRT Model Optimizer docs, "NAS") turns
the model into a search space, trains it as a supernet (in training mode every forward samples one
random subnet; ModelOpt's own recipe is an ordinary training loop, no sandwich rule, no max-subnet
step), then an evolutionary search (``mtn.search``) scores subnets inside a FLOPs constraint with a
user ``score_func`` after recalibrating BatchNorm from its own cache of batches, and ``mtn.export``
cuts the winner out. Here, per seed (data and splits exactly as slimmable.py's ``Data(seed)``):

* the untrained digits CNN (``--model digits_cnn``) or ResNet-18 adapted to 8x8 (``--model
  resnet18``), built exactly as slimmable.py builds them, converted with
  ``channels_ratio``/``features_ratio`` (0.25, 0.5, 0.75, 1.0) on a divisor-8 channel grid (the
  default divisor 32 leaves almost nothing searchable on 32-64-128 channels, see search_modelopt.py);
* trained for ``--epochs`` with the optimizer and schedule of torchslim's ``train_sandwich`` (SGD lr
  0.05, momentum 0.9, weight decay 1e-4, cosine per step), one random subnet per step;
* searched under ``{"flops": "50%"}`` and ``"25%"`` (score: validation accuracy), exported, scored as
  slimmable.py scores AutoSlim: test accuracy right after export with BatchNorm recalibrated on 4
  training batches, and after the same 2-epoch fine-tune (lr 1e-3); MACs by torchslim's counter;
* the largest (``mtn.sample(model, max)``) and smallest (``min``) subnets exported and scored after
  the same recalibration: how one-random-subnet training serves the extremes.

Notes on ModelOpt (nvidia-modelopt 0.47.0, read in its source and measured here):
- its BatchNorm-calibration cache holds 50 batches and is used only when full, so the loader handed
  to ``mtn.search`` cycles the 17 training batches up to 50 (as search_modelopt.py does);
- ``mtn.search`` exports the best subnet in place (a second ``mtn.export`` fails on an empty export
  stack), so each budget searches a deep copy of the trained supernet;
- ``model.eval()`` on a supernet trained with auto-sampling silently switches it to the max subnet;
- the evolutionary search sets the lower FLOPs bound to 0.85 x the upper one (a subnet far under
  budget is "not satisfied"), and defaults to 5000 iterations; here ``--search-iters`` (default 300,
  population 100 / candidates 25 as ModelOpt's defaults), its "num_satisfied" is reported;
- the search caches subnets by config: "num_satisfied" counts repeats, "evaluations" (score_func
  calls) the distinct subnets scored; on the CNN the space is 4 x 4 x 4 = 64 subnets (conv1, conv2,
  fc1), so 300 iterations score only 8 distinct subnets at 50% and 4 at 25% (lower bound 0.85x);
- when no sampled subnet meets the constraint ModelOpt raises nothing: the first sample (iteration 0
  is always "best") is exported whatever its FLOPs; "num_satisfied" in the JSON shows it;
- the last conv before AdaptiveAvgPool2d -> Flatten -> Linear is never searched (stays 128 wide).

Runs in ModelOpt's own virtual environment with this tree on the path:
  PYTHONPATH=$PWD nice -n 5 /work/venv-modelopt/bin/python benchmarks/slimmable_modelopt.py \
      [--model digits_cnn|resnet18] [--seeds 0 1 2] [--epochs 30] [--lr 0.05] [--search-iters 300] [--out F]
Writes benchmarks/results/slimmable_modelopt.json (keys parallel to slimmable.json's AutoSlim entries);
ResNet-18 (results/slimmable_modelopt_resnet18.json) ran with --epochs 15 --lr 0.025, as its US-Net.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import modelopt.torch.nas as mtn
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digits_task import build
from slimmable import Data, score, short_finetune

from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs
from torchslim.recovery import evaluate_accuracy

BUDGETS = (0.5, 0.25)
RATIOS = (0.25, 0.5, 0.75, 1.0)


def autonas_mode(divisor: int) -> list:
    """Mode "autonas" with widths ``RATIOS`` of every layer on a ``divisor``-channel grid."""
    conv = {"*": {"channels_ratio": RATIOS, "channel_divisor": divisor, "kernel_size": ()}}
    feat = {"*": {"features_ratio": RATIOS, "feature_divisor": divisor}}
    return [("autonas", {"nn.Conv2d": conv, "nn.Linear": feat, "nn.BatchNorm2d": feat})]


def macs_of(model: torch.nn.Module, example: torch.Tensor) -> float:
    return float(estimate_macs(DependencyGraph.build(model, example)))


def train_autonas(model: torch.nn.Module, data: Data, epochs: int, lr: float) -> float:
    """train_sandwich's optimizer and schedule; ModelOpt samples one random subnet per training forward."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(data.train)))
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for inputs, targets in data.train:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            schedule.step()
    model.eval()  # ModelOpt: back to the max subnet
    return time.perf_counter() - start


def exported_at(model: torch.nn.Module, pick) -> torch.nn.Module:
    """A copy of the supernet set to ``pick`` (max or min) of every choice and exported."""
    subnet = copy.deepcopy(model)
    mtn.sample(subnet, pick)
    return mtn.export(subnet).eval()


def counted_val_accuracy(data: Data) -> tuple[list[int], object]:
    """ModelOpt's ``score_func`` (validation accuracy, BN already recalibrated by it) and its call count."""
    calls = [0]

    def score_func(model: torch.nn.Module) -> float:
        calls[0] += 1
        return evaluate_accuracy(model, data.val)
    return calls, score_func


def run_seed(seed: int, args) -> dict:
    data = Data(seed)
    torch.manual_seed(seed)
    base = build(args.model).eval()
    full_macs = macs_of(base, data.example)
    model = mtn.convert(base, mode=autonas_mode(args.channel_divisor))
    train_seconds = train_autonas(model, data, args.epochs, args.lr)
    row: dict = {"model": args.model, "seed": seed, "train_seconds": train_seconds, "full_macs": full_macs}
    for key, pick in (("largest", max), ("smallest", min)):
        subnet = exported_at(model, pick)
        row[key] = {"macs_share": macs_of(subnet, data.example) / full_macs, "accuracy": score(subnet, data, data.test)}
    loader = list(itertools.islice(itertools.cycle(data.train), 50))
    row["autonas"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for budget in BUDGETS:
            evaluations, score_func = counted_val_accuracy(data)
            searched = copy.deepcopy(model)
            start = time.perf_counter()
            searched, state = mtn.search(
                searched, constraints={"flops": f"{100 * budget:g}%"}, dummy_input=data.example,
                config={"data_loader": loader, "collect_func": lambda batch: batch[0], "max_iter_data_loader": 50,
                        "score_func": score_func, "num_iters": args.search_iters, "verbose": False,
                        "checkpoint": os.path.join(tmp, f"autonas_{seed}_{budget}.pth")})
            seconds = time.perf_counter() - start
            found = searched.eval()  # mtn.search exports the best subnet in place
            row["autonas"][budget] = {
                "autonas_macs": macs_of(found, data.example) / full_macs,
                "autonas_after": score(found, data, data.test),
                "autonas_finetuned": 100 * evaluate_accuracy(short_finetune(found, data, args.finetune_epochs),
                                                             data.test),
                "evaluations": evaluations[0], "num_satisfied": state.get("num_satisfied"),
                "search_iters": args.search_iters, "seconds": seconds,
                "widths": {k: v for k, v in state["best"]["config"].items()
                           if k.endswith(("out_channels", "out_features"))}}
    return row


def mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0]


def summarize(rows: list[dict]) -> list[dict]:
    name = rows[0]["model"]
    out = [{"model": name, "seeds": len(rows), "train_seconds": mean_std([r["train_seconds"] for r in rows]),
            **{f"{key}_{k}": mean_std([r[key][k] for r in rows]) for key in ("largest", "smallest")
               for k in ("macs_share", "accuracy")}}]
    for budget in BUDGETS:
        entries = [r["autonas"][budget] for r in rows]
        numeric = [k for k, v in entries[0].items() if isinstance(v, (int, float))]
        out.append({"model": name, "autonas_budget": budget, "seeds": len(rows),
                    **{k: mean_std([e[k] for e in entries]) for k in numeric}})
    return out


def print_tables(summary: list[dict]) -> None:
    console = Console(width=160)
    fmt = lambda v: f"{v[0]:.1f} ± {v[1]:.1f}"  # noqa: E731
    table = Table(title=f"ModelOpt AutoNAS on {summary[0]['model']}: test accuracy % (mean ± std over seeds), right after "
                        "export (BN recalibrated) and after the same fine-tune")
    for column in ("budget", "AutoNAS MACs", "after", "FT", "satisfied / iters", "search s"):
        table.add_column(column, justify="right")
    for s in summary:
        if "autonas_budget" in s:
            table.add_row(f"{s['autonas_budget']:g}", f"{s['autonas_macs'][0]:.3f}", fmt(s["autonas_after"]),
                          fmt(s["autonas_finetuned"]), f"{s['num_satisfied'][0]:.0f} / {s['search_iters'][0]:.0f}",
                          f"{s['seconds'][0]:.1f}")
    console.print(table)
    extremes = Table(title="AutoNAS supernet (one random subnet per step) at its extremes, BN recalibrated")
    for column in ("subnet", "MACs", "accuracy", "train s"):
        extremes.add_column(column, justify="right")
    head = summary[0]
    for key in ("largest", "smallest"):
        extremes.add_row(key, f"{head[f'{key}_macs_share'][0]:.3f}", fmt(head[f"{key}_accuracy"]),
                         f"{head['train_seconds'][0]:.1f}")
    console.print(extremes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits_cnn", "resnet18"), default="digits_cnn")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--channel-divisor", type=int, default=8)
    parser.add_argument("--search-iters", type=int, default=300, help="mtn.search's num_iters (its default 5000)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "slimmable_modelopt.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "autonas"}, default=str), flush=True)
        write(args, rows)  # after every seed, so a stopped run keeps its rows
    print_tables(summarize(rows))
    print(f"wrote {args.out}")


def write(args, rows: list[dict]) -> None:
    import modelopt

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "nvidia-modelopt": modelopt.__version__}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(ratios=RATIOS, budgets=BUDGETS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "summary": summarize(rows),
                                    "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
