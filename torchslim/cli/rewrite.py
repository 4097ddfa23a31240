"""``torchslim rewrite MODEL --input ... --to separable|grouped|dilated|lowrank (--target-macs F | --setting N) --out DIR``."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from torchslim.cli._common import add_model_arguments, make_console, model_and_inputs
from torchslim.cli._errors import CliError, one_line

#: rounds in which the original and the rewritten model are timed in turn (best round kept)
ROUNDS = 3
METHODS = ("lowrank", "separable", "grouped", "dilated")

EPILOG = """examples:
  torchslim rewrite torchvision:resnet18 --input 1,3,224,224 --to separable --target-macs 0.5 --out sep/
  torchslim rewrite torchslim:modnet --input 1,3,512,512 --to separable --modules 'hr_branch.*' --target-macs 0.7 --out m/
  torchslim rewrite nets.py:Net --input 1,3,32,32 --to lowrank --setting 8 --modules 'fc*' --out n/
  torchslim rewrite nets.py:Net --input 1,3,32,32 --to lowrank --target-macs 0.5 --data nets.py:batches --out n/
  torchslim rewrite nets.py:Net --input 1,3,32,32 --to dilated --plan-only

The per-layer plan (rewrite, rank / multiplier / groups, MACs before and after, relative fit
error) is printed before anything changes; --plan-only stops there. Each layer is replaced by a
block of the same shapes under the same name, initialised from the trained weights; a short
fine-tune (distillation from the original) usually recovers what the fit lost. Depthwise and
grouped convolutions save MACs more than time on CPU (they are memory-bound): the latency row
measures what this machine gives."""


def add_parser(sub) -> None:
    p = sub.add_parser("rewrite", help="rewrite heavy layers into low-rank, separable, grouped or dilated blocks",
                       description="Replace MODEL's chosen layers by cheaper blocks of the same shapes (low-rank,\n"
                                   "depthwise-separable, grouped with channel shuffles, dilated 3x3), fitted to the\n"
                                   "trained weights; print the per-layer plan, time both models, write a checkpoint.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--to", choices=METHODS, required=True, help="the rewrite")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--target-macs", type=float, metavar="F",
                        help="rewrite until MACs <= F (a fraction of the original if <= 1, else absolute), layers "
                             "with the least fit error per MAC saved first")
    amount.add_argument("--setting", type=int, metavar="N",
                        help="rank (lowrank), depth multiplier (separable) or groups (grouped) for every chosen layer")
    p.add_argument("--modules", action="append", default=[], metavar="GLOB", help="layers to consider (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="layers to leave (repeatable)")
    p.add_argument("--data", metavar="FILE:NAME",
                   help="an iterable of batches (or a function returning one) for the data-aware fits "
                        "(lowrank: whitened SVD; grouped, dilated: least squares on the layer's inputs)")
    p.add_argument("--out", type=Path, help="output directory: a torchslim checkpoint plus report.json")
    p.add_argument("--plan-only", action="store_true", help="print the per-layer plan and stop")
    p.add_argument("--onnx", action="store_true", help="also export DIR/model.onnx, checked with onnxruntime")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the latency measurement (default 1)")
    p.add_argument("--repeats", type=int, default=20, help=f"timed runs per round ({ROUNDS} rounds, default 20)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torchslim
    from torchslim.analysis import analyze
    from torchslim.rewrite import RewriteConfig, plan_rewrite, rewrite_

    if args.out is None and not args.plan_only:
        raise CliError("--out is required (or --plan-only)")
    if args.threads < 1 or args.repeats < 1:
        raise CliError("--threads and --repeats must be >= 1")
    model, inputs = model_and_inputs(args)
    config = RewriteConfig(to=args.to, modules=args.modules, exclude=args.exclude, setting=args.setting,
                           target_macs=args.target_macs, data=_data(args))
    console = make_console()
    try:
        plan, _ = plan_rewrite(model, inputs, config)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    console.print(plan.table(), soft_wrap=True, highlight=False, markup=False)
    if args.plan_only:
        return 0
    before = analyze(model, inputs, latency=False)
    original = copy.deepcopy(model)
    try:
        result = rewrite_(model, inputs, config, plan=plan)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    after = analyze(model, inputs, latency=False)
    latency = _timed_in_turn(original, model, inputs, args)
    agreement = _agreement(original, model, inputs)
    _write_checkpoint(args, model)
    summary: dict[str, Any] = {
        "params": [before.total_params, after.total_params],
        "macs": [before.total_macs, after.total_macs],
        "latency_ms": [latency["original"].median_ms, latency["rewritten"].median_ms],
        "latency": {label: stats.to_dict() for label, stats in latency.items()},
        "output_relative_error": agreement,
        "layers": [{"name": p.name, "type": p.module_type, "rewrite": p.method, "setting": p.setting,
                    "macs_before": p.macs_before, "macs_after": p.macs_after, "fit_error": p.fit_error,
                    **({"folds": {side: str(f) for side, f in p.folds.items()}} if p.folds else {})}
                   for p in result.plan.layers],
        "checkpoint": str(args.out),
    }
    if args.onnx:
        summary["onnx"] = _export_onnx(torchslim, model, inputs, args.out / "model.onnx")
    (args.out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(console, summary)
    return 0


def _data(args: argparse.Namespace) -> list | None:
    """The --data batches as a list (the plan and the fit both read them)."""
    if not args.data:
        return None
    from torchslim.cli._model_spec import import_attribute
    from torchslim.criteria.taylor import batch_inputs

    _, _, source = import_attribute(args.data, "--data file")
    data = source() if callable(source) else source
    try:
        return [batch_inputs(b) for b in data]
    except TypeError:
        raise CliError(f"--data {args.data} is a {type(data).__name__}, not an iterable of batches") from None


def _timed_in_turn(original, rewritten, inputs, args) -> dict:
    from torchslim.latency import measure_in_turn

    return measure_in_turn({"original": original, "rewritten": rewritten}, inputs, threads=args.threads,
                           rounds=ROUNDS, warmup=5, repeats=args.repeats)


def _agreement(original, rewritten, inputs) -> float:
    """Largest relative difference of the outputs (norm of the difference over the original's)."""
    import torch

    from torchslim._inputs import call_model, iter_tensors

    with torch.no_grad():
        ours, theirs = list(iter_tensors(call_model(rewritten, inputs))), list(iter_tensors(call_model(original, inputs)))
    return max((float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
                for a, b in zip(ours, theirs) if a.is_floating_point()), default=0.0)


def _write_checkpoint(args: argparse.Namespace, model) -> None:
    import torchslim
    from torchslim.cli._model_spec import parse_json, source_metadata

    source = source_metadata(args.model, parse_json(args.model_kwargs, "--model-kwargs"), args.input,
                             parse_json(args.kwargs, "--kwargs"), args.dtype)
    try:
        torchslim.save(model, args.out, metadata={"source": source})
    except (OSError, torchslim.CheckpointError) as exc:
        raise CliError(f"cannot write the checkpoint to {args.out}: {exc}") from None


def _export_onnx(torchslim, model, inputs, path: Path) -> dict:
    try:
        return torchslim.export_onnx(model, inputs, path).to_dict()
    except (ImportError, RuntimeError) as exc:
        return {"ok": False, "message": one_line(str(exc))}


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    table = Table(title="before / after")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")
    for key in ("params", "macs"):
        b, a = summary[key]
        table.add_row(key, f"{b:,}", f"{a:,}", f"{a / b:.3f}" if b else "-")
    b, a = summary["latency_ms"]
    table.add_row("latency ms (torch)", f"{b:.3f}", f"{a:.3f}", f"{a / b:.3f}" if b else "-")
    console.print(table)
    console.print(f"output relative error vs the original: {summary['output_relative_error']:.4g} (before any fine-tune)",
                  soft_wrap=True, highlight=False)
    console.print(f"checkpoint: {summary['checkpoint']}; use it as MODEL, or torchslim.load(DIR, original_model)",
                  soft_wrap=True, highlight=False, markup=False)
