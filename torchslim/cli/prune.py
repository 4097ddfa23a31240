"""``torchslim prune MODEL --input ... (--ratio R | --target-macs F) --out DIR``."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from torchslim.cli._common import add_model_arguments, add_pruning_arguments, config_from_args, model_and_inputs
from torchslim.cli._errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="structurally prune a model and write it with a before/after report")
    add_model_arguments(p)
    add_pruning_arguments(p)
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: a torchslim checkpoint (model.safetensors, plan.json, meta.json) "
                        "plus report.json; usable as MODEL by every command")
    p.add_argument("--onnx", action="store_true", help="also export DIR/model.onnx, checked with onnxruntime")
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
    _write_checkpoint(args, model, result)
    summary = {
        "params": [before.total_params, after.total_params],
        "macs": [before.total_macs, after.total_macs],
        "size_bytes": [before.disk_bytes, after.disk_bytes],
        "latency_ms": [before.latency_ms, after.latency_ms],
        "exact": exact,
        "result": result.to_dict(),
    }
    if args.onnx:
        summary["onnx"] = _export_onnx(model, inputs, args.out / "model.onnx")
    (args.out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_table(summary)
    return 0


def _write_checkpoint(args: argparse.Namespace, model, result) -> None:
    """The pruned model as a torchslim checkpoint that records how to rebuild its original."""
    import torchslim
    from torchslim.cli._model_spec import parse_json, source_metadata

    source = source_metadata(args.model, parse_json(args.model_kwargs, "--model-kwargs"), args.input,
                             parse_json(args.kwargs, "--kwargs"), args.dtype)
    try:
        torchslim.save(model, args.out, result, metadata={"source": source})
    except (OSError, torchslim.CheckpointError) as exc:
        raise CliError(f"cannot write the checkpoint to {args.out}: {exc}") from None


def _export_onnx(model, inputs, path: Path) -> dict:
    from torchslim.io import OnnxCheckError, export_onnx

    try:
        return export_onnx(model, inputs, path).to_dict()
    except (ImportError, RuntimeError) as exc:  # OnnxCheckError is a RuntimeError
        report = exc.report.to_dict() if isinstance(exc, OnnxCheckError) else {"ok": False}
        report["message"] = str(exc).splitlines()[0]
        return report


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
