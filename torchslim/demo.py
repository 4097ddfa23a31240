"""The demo: train a small CNN on scikit-learn's bundled digits, analyse it, prune it
iteratively to <= 50% of its MACs with fine-tuning (distilled from the unpruned model)
between steps, and report accuracy, MACs and measured latency before and after."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim._timing import measure_latency


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train(model: nn.Module, x, y, epochs: int, lr: float, teacher: nn.Module | None = None, seed: int = 0,
          alpha: float = 0.5, temperature: float = 2.0) -> None:
    """Adam on mini-batches; with a teacher, the loss mixes cross-entropy and distillation."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            batch = perm[i:i + 64]
            logits = model(x[batch])
            loss = F.cross_entropy(logits, y[batch])
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x[batch]) / temperature, dim=1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean") * temperature**2
                loss = (1 - alpha) * loss + alpha * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def latency_ms(model: nn.Module, batch) -> float:
    model.eval()
    return measure_latency(lambda: model(batch), warmup=10, repeats=60, threads=1).median_ms


def run_demo(out_dir: str | Path = "demo_out", *, seed: int = 0, steps: int = 3, target_macs: float = 0.5,
             epochs: int = 15, finetune_epochs: int = 4) -> dict:
    from rich.console import Console

    console = Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    from torchslim.models import create_model

    model = create_model("digits_cnn")
    console.print(f"[bold]training[/] DigitsCNN on {len(y_train)} digits ({epochs} epochs)")
    train(model, x_train, y_train, epochs, 3e-3, seed=seed)
    example = x_test[:1]
    teacher = copy.deepcopy(model).eval()
    before = torchslim.analyze(model, example, latency=False)
    batch = x_test[:256]
    report = {
        "accuracy_before": accuracy(model, x_test, y_test),
        "macs_before": before.total_macs,
        "params_before": before.total_params,
        "latency_before_ms": latency_ms(model, batch),
        "latency_batch": len(batch),
        "steps": [],
    }
    plan = torchslim.PruningPlan()
    for step in range(1, steps + 1):
        goal = 1 - (1 - target_macs) * step / steps  # fraction of the original MACs after this step
        # target_macs is absolute here: a fraction of the ORIGINAL model's MACs
        result = torchslim.prune_(model, example, torchslim.PruneConfig(target_macs=goal * report["macs_before"], criterion="l2"))
        plan = plan.extend(result.plan)
        train(model, x_train, y_train, finetune_epochs, 1e-3, teacher=teacher, seed=seed + step)
        macs = torchslim.analyze(model, example, latency=False).total_macs
        acc = accuracy(model, x_test, y_test)
        report["steps"].append({"step": step, "macs": macs, "macs_ratio": macs / report["macs_before"], "accuracy": acc})
        console.print(f"step {step}: MACs {macs / report['macs_before']:.1%} of original, accuracy {acc:.4f}")
    after = torchslim.analyze(model, example, latency=False)
    report.update({
        "accuracy_after": accuracy(model, x_test, y_test),
        "macs_after": after.total_macs,
        "params_after": after.total_params,
        "latency_after_ms": latency_ms(model, batch),
    })
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "plan.json").write_text(json.dumps(plan.to_dict()))
    torch.save(model.state_dict(), out / "pruned_state_dict.pt")
    _plot(before, after, report, out / "plot.png")
    _markdown(report, out / "report.md")
    _print(console, report)
    return report


def _plot(before, after, report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    leaves = [r for r in before.top(50) if r.macs]
    names = [r.name for r in leaves]
    after_macs = {r.name: r.macs for r in after.layers}
    pos = np.arange(len(names))
    ax1.bar(pos - 0.2, [r.macs / 1e3 for r in leaves], 0.4, label="before")
    ax1.bar(pos + 0.2, [after_macs.get(n, 0) / 1e3 for n in names], 0.4, label="after")
    ax1.set_xticks(pos, names, rotation=45, ha="right", fontsize=7)
    ax1.set_ylabel("kMACs")
    ax1.set_title("MACs per layer")
    ax1.legend()
    xs = [1.0] + [s["macs_ratio"] for s in report["steps"]]
    ys = [report["accuracy_before"]] + [s["accuracy"] for s in report["steps"]]
    ax2.plot(xs, ys, marker="o")
    ax2.invert_xaxis()
    ax2.set_xlabel("MACs (fraction of original)")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("accuracy over pruning steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rows(report: dict):
    return [
        ("accuracy", report["accuracy_before"], report["accuracy_after"]),
        ("MACs", report["macs_before"], report["macs_after"]),
        ("params", report["params_before"], report["params_after"]),
        (f"latency (ms, batch {report['latency_batch']})", report["latency_before_ms"], report["latency_after_ms"]),
    ]


def _markdown(report: dict, path: Path) -> None:
    lines = ["# torchslim demo: DigitsCNN on scikit-learn digits", "", "| | before | after | after/before |", "|---|---|---|---|"]
    lines += [f"| {n} | {b:.4g} | {a:.4g} | {a / b:.3f} |" for n, b, a in _rows(report)]
    lines += ["", "Pruned iteratively with fine-tuning (distilled from the unpruned model) between steps.", "",
              "![plot](plot.png)", ""]
    path.write_text("\n".join(lines))


def _print(console, report: dict) -> None:
    from rich.table import Table

    table = Table(title="torchslim demo")
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right")
    for n, b, a in _rows(report):
        table.add_row(n, f"{b:.4g}", f"{a:.4g}", f"{a / b:.3f}")
    console.print(table)
