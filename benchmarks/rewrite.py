"""Structural rewrites (issue 17) next to channel pruning at the same MACs.

Models: the digits CNN (``torchslim.models`` ``digits_cnn``) and a ResNet-18 adapted to 8x8
digits (1-channel 3x3 stem, no max-pool), both trained here on scikit-learn's bundled digits,
and the MODNet-shaped net (``create_model("modnet")``, untrained: output agreement) with only
its HR-branch convolutions rewritten. Each model is rewritten to ~50% of its MACs (MODNet: the
HR branch's convolution MACs halved) with each rewrite that applies (dilated needs 5x5+
kernels: none in the digits nets or the HR branch, so for MODNet it rewrites the LR/fusion
branches' 5x5 convs, all of them, fitted by least squares on their inputs), then the same short distillation fine-tune from the
original; channel pruning (``prune_``, L1) is brought to the same MACs and fine-tuned the same
way. Reported per row: MACs, params, mean/max fit error, accuracy (MODNet: relative output error
on held-out random images) before and after the fine-tune, and latency on torch and ONNX
Runtime (original and variant timed in turn, 1 thread, best of 3 rounds). Low-rank, grouped and
dilated are fitted on the inputs of the calibration batches (``RewriteConfig(data=...)``).
The digits models run once per seed (the seed sets the stratified split, the training and the
fine-tune); the table gives mean ± std over the seeds. MODNet is untrained and runs once.
Writes benchmarks/results/rewrite.json.
Usage: python benchmarks/rewrite.py [--epochs 12] [--finetune-epochs 3] [--models digits resnet18 modnet]
       [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchslim
from torchslim.demo import load_digits_tensors
from torchslim.latency import measure_in_turn
from torchslim.models import create_model
from torchslim.recovery import evaluate_accuracy, finetune
from torchslim.rewrite import RewriteConfig, model_macs, plan_rewrite, rewrite_

METHODS = ("lowrank", "separable", "grouped", "dilated")
DATA_AWARE = ("lowrank", "grouped", "dilated")  # fitted on the calibration batches' input moments
OUT = Path(__file__).parent / "results" / "rewrite.json"


def resnet18_digits() -> nn.Module:
    """torchvision's ResNet-18 for 1x8x8 digits: a 3x3 stride-1 stem and no max-pool."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Matte(nn.Module):
    """MODNet's inference call with positional tensor inputs only (what ONNX Runtime timing takes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.model(img, inference=True)[2]


def latency(original: nn.Module, variant: nn.Module, example, runtime: str) -> dict:
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict):
        original, variant, example = Matte(original), Matte(variant), example[0]
    try:
        stats = measure_in_turn({"original": original, "variant": variant}, example, runtime=runtime, threads=1,
                                rounds=3, warmup=3, repeats=10)
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot run a variant is a row note, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"original_ms": stats["original"].median_ms, "variant_ms": stats["variant"].median_ms}


def digits_task(name: str, epochs: int, finetune_epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=512)
    model = create_model("digits_cnn") if name == "digits" else resnet18_digits()
    finetune(model, train, epochs=epochs, lr=3e-3, schedule="cosine", progress=False)
    model.eval()
    example = x_test[:8]
    data = [x_train[i:i + 256] for i in range(0, 1024, 256)]

    def score(m: nn.Module) -> float:
        return evaluate_accuracy(m, test)

    def tune(m: nn.Module, teacher: nn.Module) -> None:
        torch.manual_seed(seed + 1)
        finetune(m, train, epochs=finetune_epochs, lr=1e-3, teacher=teacher, kd_alpha=0.7, temperature=4.0,
                 schedule="cosine", progress=False)
        m.eval()

    row = run_task(name, model, example, data, score, tune, target=0.5, modules=(), metric="accuracy")
    row["seed"] = seed
    return row


def modnet_task(finetune_steps: int) -> dict:
    torch.manual_seed(0)
    model = create_model("modnet").eval()
    side = 64
    example = ((torch.randn(1, 3, side, side),), {"inference": True})
    gen = torch.Generator().manual_seed(1)
    train_imgs = [torch.rand(2, 3, side, side, generator=gen) for _ in range(8)]
    held_out = torch.rand(4, 3, side, side, generator=gen)
    with torch.no_grad():
        reference = model(held_out, inference=True)[2]
    data = [((img,), {"inference": True}) for img in train_imgs[:4]]

    def score(m: nn.Module) -> float:  # relative output error on held-out images (lower is better)
        with torch.no_grad():
            out = m(held_out, inference=True)[2]
        return float((out - reference).norm() / reference.norm())

    def tune(m: nn.Module, teacher: nn.Module) -> None:  # distil the matte on random images
        torch.manual_seed(1)
        m.eval()  # BatchNorm statistics stay those of the original (random images would skew them)
        opt = torch.optim.Adam(m.parameters(), lr=1e-4)
        for step in range(finetune_steps):
            img = train_imgs[step % len(train_imgs)]
            with torch.no_grad():
                target = teacher(img, inference=True)[2]
            loss = nn.functional.mse_loss(m(img, inference=True)[2], target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()

    modules = ("hr_branch.*.layers.0",)
    plan, _ = plan_rewrite(model, example, RewriteConfig(to="lowrank", modules=modules, setting=1))
    hr_macs = sum(p.macs_before for p in plan.layers)
    target = plan.model_macs - 0.5 * hr_macs  # the HR branch's conv MACs halved
    row = run_task("modnet", model, example, data, score, tune, target=target, modules=modules,
                   metric="relative_output_error", dilated_modules=("*conv_lr*.layers.0",))
    row["hr_conv_macs"] = hr_macs
    return row


def run_task(name: str, model: nn.Module, example, data, score, tune, *, target: float, modules, metric: str,
             dilated_modules=None) -> dict:
    """Each rewrite to ``target`` MACs over ``modules`` (dilated: every 5x5+ conv of ``dilated_modules``
    when given, the HR branch having none), then channel pruning to the same MACs."""
    macs0 = model_macs(model, example)
    print(f"== {name}: {macs0:,} MACs, {params(model):,} params, {metric} {score(model):.4f}", flush=True)
    rows = []
    for method in METHODS:
        variant = copy.deepcopy(model)
        t0 = time.perf_counter()
        scope, goal = (dilated_modules, None) if method == "dilated" and dilated_modules else (modules, target)
        config = RewriteConfig(to=method, modules=scope, target_macs=goal,
                               data=data if method in DATA_AWARE else None)
        try:
            result = rewrite_(variant, example, config)
        except ValueError as exc:
            rows.append({"variant": method, "skipped": str(exc)})
            print(f"  {method:9s} skipped: {exc}", flush=True)
            continue
        print(result.plan.table(), flush=True)
        rows.append(evaluate(method, model, variant, example, score, tune, time.perf_counter() - t0,
                             errors=list(result.errors.values())))
    # channel pruning to the same MACs budget
    goal = target * macs0 if target <= 1 else target
    variant = copy.deepcopy(model)
    t0 = time.perf_counter()
    cfg = torchslim.PruneConfig(target_macs=goal / macs0, op_names=list(modules) or None, verify=False,
                                latency_aware=False)
    torchslim.prune_(variant, example, cfg)
    rows.append(evaluate("channel pruning", model, variant, example, score, tune, time.perf_counter() - t0, errors=[]))
    return {"model": name, "macs": macs0, "params": params(model), metric: score(model), "metric": metric,
            "rows": rows}


def evaluate(label: str, original: nn.Module, variant: nn.Module, example, score, tune, seconds: float,
             errors: list[float]) -> dict:
    variant.eval()
    row = {"variant": label, "macs": model_macs(variant, example), "params": params(variant),
           "fit_error_mean": sum(errors) / len(errors) if errors else None, "fit_error_max": max(errors, default=None),
           "before_finetune": score(variant), "seconds_to_apply": seconds}
    tune(variant, original)
    row["after_finetune"] = score(variant)
    row["latency_torch"] = latency(original, variant, example, "torch")
    row["latency_onnxruntime"] = latency(original, variant, example, "onnxruntime")
    print(f"  {label:15s} MACs {row['macs']:,} params {row['params']:,} score {row['before_finetune']:.4f} -> "
          f"{row['after_finetune']:.4f} torch {row['latency_torch']} ort {row['latency_onnxruntime']}", flush=True)
    return row


def summarize(results: list[dict]) -> list[dict]:
    """Mean and population std over seeds of each (model, variant): score before and after the
    fine-tune, MACs and params relative to the original, latencies."""
    out = []
    for model in dict.fromkeys(r["model"] for r in results):
        runs = [r for r in results if r["model"] == model]
        for variant in dict.fromkeys(row["variant"] for r in runs for row in r["rows"]):
            rows = [(r, row) for r in runs for row in r["rows"] if row["variant"] == variant and "skipped" not in row]
            if not rows:
                continue
            entry = {"model": model, "variant": variant, "seeds": len(rows), "metric": runs[0]["metric"],
                     "original": _stat([r[r["metric"]] for r, _ in rows]),
                     "macs_ratio": _stat([row["macs"] / r["macs"] for r, row in rows]),
                     "params_ratio": _stat([row["params"] / r["params"] for r, row in rows])}
            for key in ("before_finetune", "after_finetune", "fit_error_mean"):
                values = [row[key] for _, row in rows if row[key] is not None]
                entry[key] = _stat(values) if values else None
            for runtime in ("latency_torch", "latency_onnxruntime"):
                timed = [row[runtime] for _, row in rows if "variant_ms" in row[runtime]]
                entry[runtime] = _stat([t["variant_ms"] / t["original_ms"] for t in timed]) if timed else None
            out.append(entry)
    return out


def _stat(values: list[float]) -> list[float]:
    return [statistics.mean(values), statistics.pstdev(values)]


def print_summary(summary: list[dict]) -> None:
    table = Table(title="rewrites vs channel pruning at ~50% MACs (mean ± std over seeds; latency: variant / original)")
    for col in ("model", "variant", "seeds", "MACs", "params", "fit error", "original", "before fine-tune",
                "after fine-tune", "torch", "ONNX Runtime"):
        table.add_column(col, justify="right")
    pm = lambda v: "-" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    for s in summary:
        table.add_row(s["model"], s["variant"], str(s["seeds"]), f"{s['macs_ratio'][0]:.3f}", f"{s['params_ratio'][0]:.3f}",
                      pm(s["fit_error_mean"]), pm(s["original"]), pm(s["before_finetune"]), pm(s["after_finetune"]),
                      pm(s["latency_torch"]), pm(s["latency_onnxruntime"]))
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18", "modnet"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="digits models only")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--modnet-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        if name == "modnet":
            results.append(modnet_task(args.modnet_steps))
            continue
        for seed in args.seeds:
            results.append(digits_task(name, args.epochs, args.finetune_epochs, seed))
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": args.threads, "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
            "modnet_finetune_steps": args.modnet_steps}
    if OUT.exists():  # keep the other models' results from an earlier run
        earlier = [r for r in json.loads(OUT.read_text())["results"] if r["model"] not in args.models]
        results = earlier + results
    summary = summarize(results)
    print_summary(summary)
    OUT.write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
