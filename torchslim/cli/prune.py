"""``torchslim prune MODEL --input ... (--ratio R | --target-macs F) --out DIR``."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from torchslim.cli._common import add_model_arguments, add_pruning_arguments, config_from_args, model_and_inputs
from torchslim.cli._errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="structurally prune a model and write it with a before/after report")
    add_model_arguments(p)
    add_pruning_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torchslim
    from torchslim.analysis import analyze

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    model, inputs = model_and_inputs(args)
    config = config_from_args(args, model)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        step = progress.add_task("analysing the original", total=4)
        before = analyze(model, inputs)
        original = copy.deepcopy(model)
        progress.update(step, advance=1, description="tracing, ranking and removing channels")
        try:
            result = torchslim.prune_(model, inputs, config)
        except (ValueError, torchslim.PruningError) as exc:
            raise CliError(str(exc)) from None
        progress.update(step, advance=1, description="analysing the pruned model")
        after = analyze(model, inputs)
        progress.update(step, advance=1, description="verifying against the zeroed original")
        exact = torchslim.verify(original, model, inputs, result.plan).ok
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan.json").write_text(json.dumps(result.plan.to_dict()))
    torch.save(model.state_dict(), args.out / "state_dict.pt")
    summary = {
        "params": [before.total_params, after.total_params],
        "macs": [before.total_macs, after.total_macs],
        "size_bytes": [before.disk_bytes, after.disk_bytes],
        "latency_ms": [before.latency_ms, after.latency_ms],
        "exact": exact,
        "result": result.to_dict(),
    }
    (args.out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_table(summary)
    return 0


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="before / after")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")
    for key in ("params", "macs", "size_bytes", "latency_ms"):
        b, a = summary[key]
        table.add_row(key, f"{b:,.2f}" if isinstance(b, float) else f"{b:,}", f"{a:,.2f}" if isinstance(a, float) else f"{a:,}",
                      f"{a / b:.3f}" if b else "-")
    Console().print(table)
