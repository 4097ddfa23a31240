"""Slimmable networks on real data: one US-Net against models trained one width at a time and
against prune-then-fine-tune, AutoSlim against uniform width at the same MACs, and the speed of
running at a width.

Tasks: the digits CNN and a ResNet-18 adapted to 8x8 digits (3x3 stride-1 stem, no max-pool),
on scikit-learn's bundled digits; 3 seeds (mean ± std). Per seed:

* US-Net: the model made slimmable over widths [0.25, 1] (untrained, channels in their initial
  order), trained with the sandwich rule (largest + smallest + 2 random widths per step, inplace
  distillation after ``--distill-warmup`` epochs on the labels; ``--layerwise``: the random widths
  drawn per group) for ``--epochs``; each width
  scored on the test split after BatchNorm calibration on 4 training batches;
* individually trained: at each width a model of exactly that shape (``export_width`` of the
  untrained slimmable model), trained alone for the same epochs with the same optimizer;
* prune-then-fine-tune: the width-1.0 individual model pruned (uniform L1) to each width's MACs,
  BatchNorm recalibrated, fine-tuned ``--finetune-epochs``;
* AutoSlim at 50% and 25% of the MACs on the trained US-Net, against the uniform width with the
  same MACs, scored right after export (BatchNorm calibrated) and after the same fine-tune, and
  with ``--retrain`` both architectures trained from scratch as the paper does;
* latency (torch, 1 thread, batch 1): the slimmable model at each width against the model
  exported at that width, timed in turn.

Writes benchmarks/results/slimmable.json.
Usage: python benchmarks/slimmable.py [--models digits_cnn resnet18] [--seeds 0 1 2] [--epochs 30]
       [--lr 0.05] [--distill-warmup N] [--layerwise] [--retrain] [--add] [--autoslim-only | --latency-only]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from search import batches, build

import torchslim
from torchslim.demo import load_digits_tensors
from torchslim.latency import measure_in_turn
from torchslim.recovery import evaluate_accuracy, finetune, recalibrate_bn_
from torchslim.slimmable import AutoSlimSearch, autoslim, calibrate_bn, export_width, make_slimmable, train_sandwich

WIDTHS = (0.25, 0.5, 0.75, 1.0)
AUTOSLIM_BUDGETS = (0.5, 0.25)


class Data:
    def __init__(self, seed: int):
        x, y, x_test, y_test = load_digits_tensors(seed=seed)
        cut = int(0.8 * len(x))
        self.train = batches(x[:cut], y[:cut], 64, seed)
        self.val, self.test = batches(x[cut:], y[cut:], 256), batches(x_test, y_test, 256)
        self.calibration = [b[0] for b in self.train[:4]]
        self.example = x[:1]


def score(model: nn.Module, data: Data, split: list) -> float:
    recalibrate_bn_(model, data.calibration)
    return 100 * evaluate_accuracy(model, split)


def fresh_slimmable(name: str, seed: int, data: Data, **kwargs):
    torch.manual_seed(seed)
    model = build(name).eval()
    return make_slimmable(model, data.example, width_range=(WIDTHS[0], 1.0), widths=WIDTHS, **kwargs)


def us_net(name: str, seed: int, data: Data, args):
    slim = fresh_slimmable(name, seed, data)
    start = time.perf_counter()
    train_sandwich(slim, data.train, args.epochs, lr=args.lr, seed=seed, layerwise=args.layerwise,
                   distill_warmup=args.distill_warmup)
    seconds = time.perf_counter() - start
    accuracy = {}
    for width in WIDTHS:
        calibrate_bn(slim, data.calibration, width)
        with slim.at_width(width):
            accuracy[width] = 100 * evaluate_accuracy(slim, data.test)
    return slim, accuracy, seconds


def individual(name: str, seed: int, data: Data, width: float | dict[int, float], epochs: int,
               lr: float) -> nn.Module:
    """A model of exactly the width's shape (or per-group widths), trained alone from scratch
    (same initialisation, optimizer, schedule and epochs as the US-Net)."""
    template = fresh_slimmable(name, seed, data)
    model = export_width(template, width, data.example) if width != 1.0 else template.remove_hooks()
    alone = make_slimmable(model, data.example, widths=(1.0,))
    train_sandwich(alone, data.train, epochs, lr=lr, seed=seed, n_random=0)
    return alone.remove_hooks().eval()


def uniform_width_for(slim, budget: float) -> float:
    """The uniform width whose MACs are closest under ``budget`` x the full width's."""
    full, low, high = slim.macs(1.0), WIDTHS[0], 1.0
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if slim.macs(mid) <= budget * full else (low, mid)
    return low


def short_finetune(model: nn.Module, data: Data, epochs: int) -> nn.Module:
    model = copy.deepcopy(model)
    finetune(model, data.train, epochs=epochs, lr=1e-3, progress=False)
    return model.eval()


def run_seed(name: str, seed: int, args) -> dict:
    data = Data(seed)
    slim, us_accuracy, us_seconds = us_net(name, seed, data, args)
    row: dict = {"model": name, "seed": seed, "us_net": us_accuracy, "us_seconds": us_seconds,
                 "macs": {w: slim.macs(w) for w in WIDTHS}}
    start = time.perf_counter()
    singles = {w: individual(name, seed, data, w, args.epochs, args.lr) for w in WIDTHS}
    row["individual_seconds"] = time.perf_counter() - start
    row["individual"] = {w: 100 * evaluate_accuracy(m, data.test) for w, m in singles.items()}
    full = singles[1.0]
    pruned = {}
    for w in WIDTHS[:-1]:
        model = copy.deepcopy(full)
        config = torchslim.PruneConfig(target_macs=slim.macs(w) / slim.macs(1.0), exact_only=True,
                                       latency_aware=False, verify=False)
        torchslim.prune_(model, data.example, config)
        recalibrate_bn_(model, data.calibration)
        pruned[w] = 100 * evaluate_accuracy(short_finetune(model, data, args.finetune_epochs), data.test)
    row["prune_finetune"] = pruned
    row["autoslim"] = autoslim_rows(name, seed, slim, data, args)
    row["latency_ms"] = latencies(slim, data.example)
    return row


def latencies(slim, x: torch.Tensor) -> dict:
    """Per width, ms at batch 1 on 1 thread: the slimmable model at the width and the model
    exported at it, timed in turn (``measure_in_turn``: 30 rounds of 50 calls each, each one's
    least-disturbed round), so that load from other jobs on the machine falls on both alike."""
    out = {}
    for w in WIDTHS:
        models = {"slimmable": slim} if w == 1.0 else {"slimmable": slim, "exported": export_width(slim, w, x)}
        with slim.at_width(w):
            stats = measure_in_turn(models, x, threads=1, rounds=30, warmup=10, repeats=50)
        times = {label: entry.median_ms for label, entry in stats.items()}
        out[w] = {"slimmable": times["slimmable"], "exported": times.get("exported", times["slimmable"])}
    return out


def rerun_latency(name: str, seed: int, args) -> dict:
    """``--latency-only``: the row --out holds for (name, seed) with its latency columns measured
    again (on the untrained slimmable model: the weights' values do not change the time)."""
    data = Data(seed)
    return {**stored_row(args, name, seed), "latency_ms": latencies(fresh_slimmable(name, seed, data), data.example)}


def stored_row(args, name: str, seed: int) -> dict:
    """The row --out holds for (name, seed), its settings checked against this run's."""
    rows = [r for r in earlier_rows(args, []) if (r["model"], r["seed"]) == (name, seed)]
    if not rows:
        raise SystemExit(f"{args.out} has no row for {name} seed {seed} to update")
    return rows[0]


def rerun_autoslim(name: str, seed: int, args) -> dict:
    """``--autoslim-only``: the row --out holds for (name, seed) with the US-Net retrained (the
    same seed) and its AutoSlim rows measured again; the other columns kept as they were."""
    row = stored_row(args, name, seed)
    data = Data(seed)
    slim, us_accuracy, us_seconds = us_net(name, seed, data, args)
    return {**row, "us_net": us_accuracy, "us_seconds": us_seconds,
            "autoslim": autoslim_rows(name, seed, slim, data, args)}


def validation_scorer(data: Data, kind: str):
    """AutoSlim's candidate score on the validation split: accuracy, or minus the mean
    cross-entropy (continuous: on a few hundred images many candidates tie on accuracy)."""
    if kind == "accuracy":
        return lambda model: evaluate_accuracy(model, data.val)

    @torch.no_grad()
    def minus_loss(model: nn.Module) -> float:
        model.eval()
        total = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in data.val)
        return -total / sum(len(y) for _, y in data.val)
    return minus_loss


def autoslim_rows(name: str, seed: int, slim, data: Data, args) -> dict:
    """AutoSlim at each budget against the uniform width with the same MACs (see the module docstring)."""
    rows = {}
    for budget in AUTOSLIM_BUDGETS:
        start = time.perf_counter()
        evaluate = validation_scorer(data, args.autoslim_score)  # the search recalibrates BatchNorm first
        result, found, _ = autoslim(slim, data.example, evaluate, data=data.calibration, target_macs=budget)
        seconds = time.perf_counter() - start
        width = uniform_width_for(slim, budget)
        uniform = export_width(slim, width, data.example)
        rows[budget] = {
            "autoslim_macs": result.macs / slim.macs(1.0), "uniform_width": width,
            "uniform_macs": slim.macs(width) / slim.macs(1.0),
            "autoslim_after": score(found, data, data.test), "uniform_after": score(uniform, data, data.test),
            "autoslim_finetuned": 100 * evaluate_accuracy(short_finetune(found, data, args.finetune_epochs), data.test),
            "uniform_finetuned": 100 * evaluate_accuracy(short_finetune(uniform, data, args.finetune_epochs), data.test),
            "evaluations": len(result.history), "seconds": seconds, "score": args.autoslim_score,
            "autoslim_kept_uniform": kept_uniform(result)}
        if args.retrain:  # the paper's protocol: each found architecture trained from scratch
            found_widths = {g: 1.0 - r for g, r in result.ratios.items()}
            rows[budget]["autoslim_retrained"] = 100 * evaluate_accuracy(
                individual(name, seed, data, found_widths, args.epochs, args.lr), data.test)
            rows[budget]["uniform_retrained"] = 100 * evaluate_accuracy(
                individual(name, seed, data, width, args.epochs, args.lr), data.test)
        print(json.dumps({"model": name, "budget": budget, **rows[budget]}), flush=True)
    return rows


def kept_uniform(result) -> bool:
    """Whether AutoSlim returned the uniform width it also scores (it scored above the greedy path's end)."""
    return any(r.note == AutoSlimSearch.uniform_note and r.ratios == result.ratios for r in result.history)


def mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0]


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        for w in WIDTHS:
            out.append({"model": name, "width": w, "seeds": len(mine),
                        "macs_share": mine[0]["macs"][w] / mine[0]["macs"][1.0],
                        "us_net": mean_std([r["us_net"][w] for r in mine]),
                        "individual": mean_std([r["individual"][w] for r in mine]),
                        "prune_finetune": mean_std([r["prune_finetune"][w] for r in mine]) if w < 1 else None,
                        "latency_slimmable_ms": mean_std([r["latency_ms"][w]["slimmable"] for r in mine]),
                        "latency_exported_ms": mean_std([r["latency_ms"][w]["exported"] for r in mine])})
        for budget in AUTOSLIM_BUDGETS:
            entries = [r["autoslim"][budget] for r in mine]
            out.append({"model": name, "autoslim_budget": budget, "seeds": len(mine),
                        "score": sorted({e.get("score", "accuracy") for e in entries}),
                        **{k: mean_std([e[k] for e in entries]) for k in entries[0]
                           if k != "score" and all(k in e for e in entries)}})
    return out


def kept_count(summary: dict) -> str:
    """'k/n': in how many of the n seeds AutoSlim returned the uniform width ('-' before it could)."""
    share = summary.get("autoslim_kept_uniform")
    return "-" if share is None else f"{round(share[0] * summary['seeds'])}/{summary['seeds']}"


def print_tables(summary: list[dict]) -> None:
    console = Console(width=160)
    widths = Table(title="US-Net (one model, sandwich rule) vs individually trained vs prune + fine-tune: test "
                         "accuracy % (mean ± std over seeds); latency ms at batch 1, 1 thread")
    for column in ("model", "width", "MACs", "US-Net", "individual", "prune+FT", "slimmable ms", "exported ms"):
        widths.add_column(column, justify="right")
    fmt = lambda v: "-" if v is None else f"{v[0]:.1f} ± {v[1]:.1f}"  # noqa: E731
    for s in summary:
        if "width" in s:
            widths.add_row(s["model"], f"{s['width']:g}", f"{s['macs_share']:.3f}", fmt(s["us_net"]),
                           fmt(s["individual"]), fmt(s["prune_finetune"]), f"{s['latency_slimmable_ms'][0]:.3f}",
                           f"{s['latency_exported_ms'][0]:.3f}")
    console.print(widths)
    auto = Table(title="AutoSlim vs uniform width on the US-Net at the same MACs: right after export (BN calibrated) "
                       "and after the same fine-tune")
    for column in ("model", "budget", "AutoSlim MACs", "uniform MACs", "AutoSlim after", "uniform after",
                   "AutoSlim FT", "uniform FT", "AutoSlim retrained", "uniform retrained", "kept uniform", "evals",
                   "s"):
        auto.add_column(column, justify="right")
    for s in summary:
        if "autoslim_budget" in s:
            auto.add_row(s["model"], f"{s['autoslim_budget']:g}", f"{s['autoslim_macs'][0]:.3f}",
                         f"{s['uniform_macs'][0]:.3f}", fmt(s["autoslim_after"]), fmt(s["uniform_after"]),
                         fmt(s["autoslim_finetuned"]), fmt(s["uniform_finetuned"]), fmt(s.get("autoslim_retrained")),
                         fmt(s.get("uniform_retrained")), kept_count(s), f"{s['evaluations'][0]:.0f}",
                         f"{s['seconds'][0]:.1f}")
    console.print(auto)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits_cnn"], choices=["digits_cnn", "resnet18"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layerwise", action="store_true",
                        help="US-Net: draw the sandwich rule's random widths per group (train_sandwich(layerwise=True))")
    parser.add_argument("--distill-warmup", type=int, default=0, metavar="N",
                        help="US-Net: train every width on the labels for the first N epochs, then distil in place "
                             "(train_sandwich(distill_warmup=N); N = --epochs: no inplace distillation)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "slimmable.json")
    parser.add_argument("--add", action="store_true",
                        help="keep the rows --out already has for other models and seeds (same settings): a long "
                             "sweep run a seed at a time, or several seeds side by side")
    parser.add_argument("--autoslim-score", choices=("accuracy", "loss"), default="accuracy",
                        help="AutoSlim's candidate score on the validation split")
    parser.add_argument("--retrain", action="store_true",
                        help="also train AutoSlim's architecture and the uniform one from scratch (the paper's "
                             "protocol; same epochs as the US-Net)")
    parser.add_argument("--autoslim-only", action="store_true",
                        help="retrain each US-Net and measure its AutoSlim rows again, keeping the other columns of "
                             "the rows --out holds (implies --add)")
    parser.add_argument("--latency-only", action="store_true",
                        help="measure the latency columns of the rows --out holds again (implies --add)")
    args = parser.parse_args()
    args.add = args.add or args.autoslim_only or args.latency_only
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for name in args.models:
        for seed in args.seeds:
            rerun = rerun_autoslim if args.autoslim_only else rerun_latency if args.latency_only else run_seed
            rows.append(rerun(name, seed, args))
            print(json.dumps({"model": name, "seed": seed, "us_net": rows[-1]["us_net"],
                              "individual": rows[-1]["individual"]}), flush=True)
            write(args, rows)
    print_tables(summarize(rows))
    print(f"wrote {args.out}")


COMPARED_SETTINGS = ("epochs", "finetune_epochs", "lr", "layerwise", "distill_warmup")


def earlier_rows(args, rows: list[dict]) -> list[dict]:
    """With ``--add``: the rows --out holds for other (model, seed) pairs, read at write time so
    that runs side by side keep each other's; refused if they were run with other settings."""
    if not (args.add and args.out.exists()):
        return []
    earlier = json.loads(args.out.read_text())
    for key in COMPARED_SETTINGS:
        if earlier["settings"].get(key, False) != getattr(args, key):
            raise SystemExit(f"--add: {args.out} was run with {key}={earlier['settings'].get(key)}, "
                             f"this run with {getattr(args, key)}")
    mine = {(r["model"], r["seed"]) for r in rows}
    return [float_keys(r) for r in earlier["rows"] if (r["model"], r["seed"]) not in mine]


def float_keys(value):
    """A row read back from JSON with its width and budget keys floats again (JSON wrote them as strings)."""
    if not isinstance(value, dict):
        return value
    try:
        return {float(k): float_keys(v) for k, v in value.items()}
    except ValueError:
        return {k: float_keys(v) for k, v in value.items()}


def write(args, rows: list[dict]) -> None:
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    rows = sorted(earlier_rows(args, rows) + rows, key=lambda r: (r["model"], r["seed"]))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["seeds"] = sorted({r["seed"] for r in rows})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "summary": summarize(rows),
                                    "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
