"""The demo: train a small CNN on scikit-learn's bundled digits, prune it iteratively to
<= 50% of its MACs with distillation fine-tuning between steps, recalibrate BatchNorm, and
report accuracy, MACs, parameters and measured latency before and after.

Outputs in ``out_dir``: ``report.json``, ``report.md``, ``plot.png`` (per-layer MACs before
and after; accuracy against MACs over the steps) and ``pruned/``, the pruned model as a
torchslim checkpoint (weights in safetensors, the composed plan as JSON; ``torchslim.load``
or any CLI command re-creates it from a fresh ``torchslim:digits_cnn``). Without matplotlib
the plot is skipped and the report says so (``report["plot"]`` is None, ``plot_skipped`` why).
"""
from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchslim
from torchslim._timing import fixed_threads, measure_latency
from torchslim.recovery import evaluate_accuracy, finetune, recalibrate_bn_

# (train epochs, pruning steps, fine-tune epochs per step, latency rounds x repeats)
_FULL = dict(epochs=20, steps=4, finetune_epochs=3, latency_rounds=7, latency_repeats=15)
_QUICK = dict(epochs=12, steps=2, finetune_epochs=3, latency_rounds=3, latency_repeats=10)
LATENCY_BATCH = 256
CALIBRATION_BATCH = 512


def load_digits_tensors(seed: int = 0, test_size: float = 0.25):
    """scikit-learn's bundled 8x8 digits as ``(x_train, y_train, x_test, y_test)``: images
    scaled to [0, 1] with shape (N, 1, 8, 8), a stratified split seeded by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed,
                                           stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def _macs(model, example) -> int:
    from torchslim.graph import DependencyGraph
    from torchslim.graph.macs import estimate_macs

    return int(estimate_macs(DependencyGraph.build(model, example)))


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _latency(models: dict, batch: torch.Tensor, rounds: int, repeats: int, threads: int = 1) -> dict[str, float]:
    """Median latency (ms) of each model on ``batch``: models are timed in alternation, round
    after round, so that load changes on the machine hit all of them alike; each round is
    a warmed-up median (``torchslim._timing.measure_latency``); the result is the median of
    the round medians."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()
    for _ in range(rounds):
        for name, model in models.items():
            stats = measure_latency(functools.partial(model, batch), warmup=3, repeats=repeats, threads=threads)
            samples[name].append(stats.median_ms)
    return {name: float(np.median(values)) for name, values in samples.items()}


def run_demo(out_dir: str | Path = "demo_out", *, seed: int = 0, steps: int | None = None, target_macs: float = 0.5,
             quick: bool = False, epochs: int | None = None, finetune_epochs: int | None = None,
             criterion: str = "l2", round_to: int = 8, progress: bool = True, console=None) -> dict:
    """Train, prune iteratively to ``target_macs`` of the original MACs, fine-tune, report.

    ``steps`` pruning steps follow a geometric schedule (each removes the same fraction of the
    MACs left) so that after step k the model has ``target_macs ** (k / steps)`` of the original
    MACs; each is followed by ``finetune_epochs`` of fine-tuning distilled from the unpruned
    model. BatchNorm statistics are recalibrated at the end. ``quick`` trains and times less
    (about 5 s instead of about 10 s on one core). Returns the report (also written as JSON).
    """
    from rich.console import Console

    if not 0 < target_macs < 1:
        raise ValueError(f"target_macs must be a fraction in (0, 1), got {target_macs}")
    settings = dict(_QUICK if quick else _FULL)
    for key, value in (("steps", steps), ("epochs", epochs), ("finetune_epochs", finetune_epochs)):
        if value is not None:
            settings[key] = int(value)
    if settings["steps"] < 1:
        raise ValueError(f"steps must be >= 1, got {settings['steps']}")
    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with fixed_threads(1) as threads:  # tiny batches: one thread is as fast and immune to a busy machine
        report = _run(out, seed, settings, target_macs, criterion, round_to, progress, console)
    report["threads"] = threads
    report["seconds"] = time.perf_counter() - started
    report["settings"] = {**settings, "seed": seed, "quick": quick, "target_macs": target_macs,
                          "criterion": criterion, "round_to": round_to}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _markdown(report, out / "report.md")
    _print(console, report)
    return report


def _run(out: Path, seed: int, s: dict, target_macs: float, criterion: str, round_to: int, progress: bool,
         console) -> dict:
    from torchslim.models.digits import DigitsCNN

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=512)
    calib_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=CALIBRATION_BATCH)
    example = x_test[:1]

    model = DigitsCNN()
    console.print(f"[bold]1/4 training[/] DigitsCNN on {len(y_train)} digits ({s['epochs']} epochs, "
                  f"{len(y_test)} held out)")
    finetune(model, train_loader, epochs=s["epochs"], lr=3e-3, schedule="cosine", progress=progress)
    model.eval()
    teacher = copy.deepcopy(model).eval()
    before = torchslim.analyze(model, example, latency=False)
    macs_before = _macs(model, example)
    report: dict = {
        "accuracy_before": evaluate_accuracy(model, test_loader),
        "macs_before": macs_before,
        "params_before": _params(model),
        "steps": [],
    }
    console.print(f"  accuracy {report['accuracy_before']:.4f}, {macs_before / 1e6:.3f} M MACs, "
                  f"{report['params_before']} params")

    console.print(f"[bold]2/4 pruning[/] to <= {target_macs:.0%} of the MACs in {s['steps']} steps "
                  f"(then {s['finetune_epochs']} epochs distilled)")
    plan = torchslim.PruningPlan()
    current = macs_before
    for k in range(1, s["steps"] + 1):
        goal = target_macs ** (k / s["steps"]) if k < s["steps"] else target_macs  # of the original MACs
        fraction = min(1.0, goal * macs_before / current)  # prune_ measures against the model it gets
        t0 = time.perf_counter()
        result = torchslim.prune_(model, example, torchslim.PruneConfig(target_macs=fraction, criterion=criterion,
                                                                        round_to=round_to, seed=seed))
        plan = plan.extend(result.plan)
        current = _macs(model, example)
        acc_pruned = evaluate_accuracy(model, test_loader)
        torch.manual_seed(seed * 1000 + k)
        finetune(model, train_loader, epochs=s["finetune_epochs"], lr=1e-3, teacher=teacher, kd_alpha=0.7,
                 temperature=4.0, schedule="cosine", progress=progress)
        acc = evaluate_accuracy(model, test_loader)
        report["steps"].append({"step": k, "goal": goal, "macs": current, "macs_ratio": current / macs_before,
                                "params": _params(model), "accuracy_pruned": acc_pruned, "accuracy": acc,
                                "seconds": time.perf_counter() - t0})
        console.print(f"  step {k}: {current / macs_before:6.1%} of the MACs, accuracy {acc_pruned:.4f} pruned, "
                      f"{acc:.4f} fine-tuned")

    console.print("[bold]3/4 recalibrating[/] BatchNorm statistics on the training set")
    report["accuracy_before_recalibration"] = report["steps"][-1]["accuracy"]
    recalibrate_bn_(model, calib_loader)
    model.eval()
    report["accuracy_after"] = evaluate_accuracy(model, test_loader)
    report["macs_after"] = current
    report["params_after"] = _params(model)
    after = torchslim.analyze(model, example, latency=False)

    console.print(f"[bold]4/4 timing[/] a batch of {LATENCY_BATCH} on 1 thread, both models alternately")
    batch = torch.cat([x_test, x_train])[:LATENCY_BATCH].contiguous()
    latency = _latency({"before": teacher, "after": model}, batch, s["latency_rounds"], s["latency_repeats"])
    report.update({"latency_before_ms": latency["before"], "latency_after_ms": latency["after"],
                   "latency_batch": LATENCY_BATCH, "latency_threads": 1})
    report["channels"] = {n: [int(m.in_channels), int(m.out_channels)]
                          for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}

    # a torchslim checkpoint (safetensors + JSON plan, no pickle): `torchslim analyze DIR/pruned`
    from torchslim.cli import source_metadata

    source = source_metadata("torchslim:digits_cnn", {}, ["1,1,8,8"], {})
    torchslim.save(model, out / "pruned", plan, metadata={"source": source, "report": "report.json"})
    _plot_if_possible(before, after, report, out / "plot.png", console)
    return report


# outputs -----------------------------------------------------------------------------------------
PLOT_EXTRA = "pip install 'torchslim[demo]'"


def _plot_if_possible(before, after, report: dict, path: Path, console) -> None:
    """Write the plot, or, without matplotlib, record in the report why there is none (a stale
    plot from an earlier run is removed so that nothing contradicts the report)."""
    path.unlink(missing_ok=True)
    try:
        _plot(before, after, report, path)
    except ImportError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        report["plot"], report["plot_skipped"] = None, f"matplotlib is not installed ({PLOT_EXTRA})"
        console.print(f"  no plot: matplotlib is not installed ({PLOT_EXTRA}); report.json and report.md are "
                      "complete without it", highlight=False)
    else:
        report["plot"] = path.name


def _plot(before, after, report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    leaves = [r for r in before.layers if r.is_leaf and r.name and r.macs]  # model order
    after_macs = {r.name: r.macs for r in after.layers}
    names = [r.name for r in leaves]
    pos = np.arange(len(names))
    ax1.bar(pos - 0.2, [r.macs / 1e3 for r in leaves], 0.4, label="before")
    ax1.bar(pos + 0.2, [after_macs.get(n, 0) / 1e3 for n in names], 0.4, label="after")
    ax1.set_xticks(pos, [f"{n}\n{r.type}" for n, r in zip(names, leaves)], fontsize=7)
    ax1.set_ylabel("kMACs")
    ax1.set_title(f"MACs per layer: {report['macs_before'] / 1e6:.2f} M -> {report['macs_after'] / 1e6:.2f} M")
    ax1.legend()

    xs, ys = [1.0], [report["accuracy_before"]]
    for st in report["steps"]:
        xs += [st["macs_ratio"], st["macs_ratio"]]
        ys += [st["accuracy_pruned"], st["accuracy"]]
    ax2.plot(xs, ys, color="tab:gray", lw=1, zorder=1)
    ax2.scatter([1.0] + [st["macs_ratio"] for st in report["steps"]],
                [report["accuracy_before"]] + [st["accuracy"] for st in report["steps"]],
                label="after fine-tuning", zorder=2)
    ax2.scatter([st["macs_ratio"] for st in report["steps"]], [st["accuracy_pruned"] for st in report["steps"]],
                marker="x", color="tab:red", label="right after pruning", zorder=2)
    ax2.scatter([report["macs_after"] / report["macs_before"]], [report["accuracy_after"]], marker="*", s=150,
                color="tab:green", label="final (BN recalibrated)", zorder=3)
    ax2.axhline(report["accuracy_before"] - 0.01, color="tab:gray", ls=":", lw=1, label="1 point below original")
    ax2.invert_xaxis()
    ax2.set_xlabel("MACs (fraction of original)")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("accuracy over the pruning steps")
    ax2.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rows(report: dict):
    return [
        ("accuracy", report["accuracy_before"], report["accuracy_after"], ".4f"),
        ("MACs", report["macs_before"], report["macs_after"], ",d"),
        ("params", report["params_before"], report["params_after"], ",d"),
        (f"latency (ms, batch {report['latency_batch']}, 1 thread)", report["latency_before_ms"],
         report["latency_after_ms"], ".3f"),
    ]


def _markdown(report: dict, path: Path) -> None:
    lines = ["# torchslim demo: DigitsCNN on scikit-learn digits", "",
             "| | before | after | after/before |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {format(b, f)} | {format(a, f)} | {a / b:.3f} |" for n, b, a, f in _rows(report)]
    lines += ["", "## Steps", "", "| step | MACs (of original) | params | accuracy after pruning | after fine-tuning |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {st['step']} | {st['macs_ratio']:.1%} | {st['params']:,} | {st['accuracy_pruned']:.4f} | "
              f"{st['accuracy']:.4f} |" for st in report["steps"]]
    lines += ["", f"BatchNorm recalibrated at the end: accuracy {report['accuracy_before_recalibration']:.4f} -> "
              f"{report['accuracy_after']:.4f}.", "",
              f"Seed {report['settings']['seed']}, {report['seconds']:.1f} s. Pruned channels are physically removed; "
              "fine-tuning distils from the unpruned model.", "",
              f"![plot]({report['plot']})" if report.get("plot") else f"No plot: {report['plot_skipped']}.", ""]
    path.write_text("\n".join(lines))


def _print(console, report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"torchslim demo (seed {report['settings']['seed']}, {report['seconds']:.1f} s)")
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right")
    for n, b, a, f in _rows(report):
        table.add_row(n, format(b, f), format(a, f), f"{a / b:.3f}")
    console.print(table)
