"""``torchslim prune MODEL --input ... (--ratio R | --target-macs F | ...) --out DIR``."""
from __future__ import annotations

import argparse
import copy
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchslim.cli._common import (add_model_arguments, add_pruning_arguments, check_pruning_flags, config_from_args,
                                   data_batches, make_console, model_and_inputs, pruning_data)
from torchslim.cli._errors import CliError, one_line, print_warning

if TYPE_CHECKING:
    from rich.progress import TaskID

#: rounds in which the original and the pruned model are timed in turn (best round kept)
ROUNDS = 3
LOG = logging.getLogger("torchslim.cli")

EPILOG = """examples:
  torchslim prune torchvision:resnet18 --input 1,3,224,224 --target-macs 0.5 --out pruned/
  torchslim prune torchvision:resnet18 --input 1,3,224,224 --target-macs 0.5 --no-latency-table --round-to 8 --out p/
  torchslim prune torchslim:modnet --input 1,3,512,512 --kwargs '{"inference": false}' --ratio 0.3 --exact-only --out m/
  torchslim prune hf:llama --input 1,16 --target-macs 0.5 --out llama/ --model-kwargs \\
      '{"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8}'
  torchslim prune nets.py:Net --input 1,3,32,32 --criterion fisher --data nets.py:batches --target-macs 0.6 --out n/
  torchslim prune nets.py:Net --input 1,3,32,32 --recipe recipe.yaml --onnx --out n/
  torchslim prune torchvision:resnet50 --input 1,3,224,224 --drop-blocks 4 --out shallow/
  torchslim prune hf:llama --input 1,16 --drop-blocks 1 --target-macs 0.5 --out llama/ --model-kwargs \\
      '{"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8}'
  torchslim prune hf:mixtral --input 2,16 --expert-ratio 0.25 --data calib.py:batches --out moe/ --model-kwargs \
      '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_local_experts": 8}'

With --target-macs the per-layer latency table of this machine is used (measured once per
runtime and thread count, cached under ~/.cache/torchslim; --no-latency-table skips it): the
MACs budget goes where the time is and widths land on fast sizes. The table printed at the end
compares params, MACs, file size and latency (original and pruned timed in turn over 3 rounds,
best round kept, p10-p90 shown), says whether the pruned model equals the zeroed original and
where the checkpoint went. DIR works as MODEL for every command.

--drop-blocks N first removes the N blocks (entries of a ModuleList/Sequential that keep their
input's shape: transformer layers, residual blocks; --blocks GLOB narrows them) that turn their
input least (block influence, 1 - cosine of input and output, on the --data batches or the
example input); without --ratio/--target-macs/--recipe no channels are pruned after it.
--expert-ratio removes whole experts of mixture-of-experts layers instead of channels, the least
routed to first, and compares the result with the original itself (removing an expert is not
zeroing it)."""


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="structurally prune a model and write it with a before/after report",
                       description="Structurally prune MODEL (channels, heads, hidden units are physically removed),\n"
                                   "check it against the original with the removed channels zeroed, time both, and\n"
                                   "write a torchslim checkpoint and report.json into --out.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_pruning_arguments(p, amount_required=False, experts=True)
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: a torchslim checkpoint (model.safetensors, plan.json, meta.json) "
                        "plus report.json; usable as MODEL by every command")
    p.add_argument("--drop-blocks", type=int, default=0, metavar="N",
                   help="depth pruning first: remove the N least influential blocks (see below)")
    p.add_argument("--blocks", action="append", default=[], metavar="GLOB",
                   help="with --drop-blocks: only these blocks may go (module path globs, e.g. 'model.layers.*')")
    p.add_argument("--onnx", action="store_true", help="also export DIR/model.onnx, checked with onnxruntime")
    p.add_argument("--repeats", type=int, default=20,
                   help=f"timed runs per round for the before/after latency ({ROUNDS} rounds, default 20)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torchslim
    from torchslim.analysis import analyze

    check_pruning_flags(args)
    if args.repeats < 1:
        raise CliError(f"--repeats must be >= 1, got {args.repeats}")
    if args.drop_blocks < 0 or (args.blocks and not args.drop_blocks):
        raise CliError("--drop-blocks takes a positive number of blocks" if args.drop_blocks < 0
                       else "--blocks says which blocks --drop-blocks may remove: give --drop-blocks N too")
    experts = args.expert_ratio is not None
    width = any(v is not None for v in (args.ratio, args.target_macs, args.recipe, args.target_latency))
    if not (width or experts or args.drop_blocks):
        raise CliError("one of the arguments --ratio --target-macs --target-latency --recipe --expert-ratio "
                       "(or --drop-blocks) is required")
    model, inputs = model_and_inputs(args)
    config = config_from_args(args, model) if width else None
    data = pruning_data(args, model, config) if config is not None else (
        {"data": data_batches(args, model)} if args.data else {})
    with _Steps(4 + args.onnx + bool(args.drop_blocks) + (width or experts)) as steps:
        steps.start("measuring params, MACs and size of the original")
        before = analyze(model, inputs, latency=False)
        original = copy.deepcopy(model)
        outcome: dict[str, Any] = {}
        plan = torchslim.PruningPlan()
        try:
            if args.drop_blocks:
                steps.start(f"ranking blocks by block influence and dropping {args.drop_blocks}")
                depth = torchslim.prune_depth_(model, inputs, args.drop_blocks, data=data.get("data"),
                                               blocks=args.blocks or None)
                outcome["depth"], plan = depth.to_dict(), depth.plan
                if config is not None:
                    config, width = _target_after_depth(args, model, config, depth.macs_ratio, width)
            result = None
            if experts:
                steps.start(_experts_step(args))
                result = torchslim.prune_experts_(model, inputs, ratio=args.expert_ratio,
                                                  importance=args.expert_importance, **data)
            elif width and config is not None:
                steps.start(_pruning_step(config))
                result = torchslim.prune_(model, inputs, config, **data)
            if result is not None:
                outcome.update(result.to_dict())
                plan = plan.extend(result.plan)
        except (ValueError, torchslim.PruningError) as exc:
            raise CliError(str(exc)) from None
        steps.start("measuring the pruned model and checking it against the " + ("original" if experts else
                                                                                  "zeroed original"))
        after = analyze(model, inputs, latency=False)
        check = _experts_check(result) if experts else _zeroed_check(torchslim.verify(original, model, inputs, plan))
        steps.start(f"timing the original and the pruned model in turn: {ROUNDS} rounds of {args.repeats} runs, "
                    f"{args.threads} thread(s)")
        latency, noise = _timed_in_turn(original, model, inputs, args)
        steps.start(f"writing the checkpoint to {args.out}")
        _write_checkpoint(args, model)
        summary = {
            "params": [before.total_params, after.total_params],
            "macs": [before.total_macs, after.total_macs],
            "size_bytes": [before.disk_bytes, after.disk_bytes],
            "latency_ms": [latency["original"].median_ms, latency["pruned"].median_ms],
            "latency": {label: stats.to_dict() for label, stats in latency.items()},
            "latency_warnings": noise,
            **check,
            "checkpoint": str(args.out),
            "result": outcome,
        }
        if args.onnx:
            steps.start(f"exporting {args.out / 'model.onnx'} and checking it with onnxruntime")
            summary["onnx"] = _export_onnx(model, inputs, args.out / "model.onnx")
    (args.out / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_table(summary)
    return 0


class _Steps:
    """Progress of the command's steps: a bar with "step i/n" and what is happening, each step
    also logged (``torchslim.cli`` logger, INFO) so that a log or a non-terminal run shows it."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.total, self.done = total, 0
        self.progress = Progress(SpinnerColumn(), TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
                                 BarColumn(bar_width=20), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 transient=True)
        self.task: TaskID | None = None

    def __enter__(self) -> "_Steps":
        self.progress.__enter__()
        self.task = self.progress.add_task("starting", total=self.total)
        return self

    def start(self, description: str) -> None:
        self.done += 1
        LOG.info("step %d/%d: %s", self.done, self.total, description)
        if self.task is not None:
            self.progress.update(self.task, completed=self.done, description=description)

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _zeroed_check(report) -> dict:
    """The report's exactness fields: the pruned model against the original with the removed channels zeroed."""
    return {"exact": report.ok, "max_abs_error": report.max_abs_error, "max_rel_error": report.max_rel_error,
            "exactness_note": report.message}


def _experts_check(result) -> dict:
    """The report's exactness fields after removing experts: the pruned model against the original
    (``deviation``: relative L2 error, present when they differ beyond the dtype's tolerance)."""
    return {"exact": result.inexact_deviation is None, "compared_with": "original", "max_abs_error": result.max_abs_error,
            "deviation": result.inexact_deviation, "experts_removed": result.experts_removed}


def _experts_step(args: argparse.Namespace) -> str:
    source = f"--data {args.data}" if args.data else "the example input"
    return (f"tracing the model, counting its routers' choices on {source} and removing {args.expert_ratio:g} of "
            f"each mixture-of-experts layer's experts, least {args.expert_importance.replace('_', ' ')} first")


def _pruning_step(config) -> str:
    """What ``prune_`` is about to do, in words (the slow parts named)."""
    target = config.target
    goal = f"to {target.value:g} of the {target.quantity}" if target else f"by {config.ratio:g} per group"
    criterion = config.criterion if isinstance(config.criterion, str) else type(config.criterion).__name__
    text = f"tracing the graph, ranking channels by {criterion} and removing them {goal}"
    if config.needs_latency:
        from torchslim.latency import LatencyTable

        table = LatencyTable(config.latency_runtime, config.latency_threads)
        text += (f"; per-layer latency table {'cached' if table.path.exists() else 'measured now, once for this machine'}"
                 f" ({table.path})")
        if config.latency_aware and target and target.quantity == "macs":
            text += "; the candidate removals are timed and the fastest kept"
    return text


def _target_after_depth(args: argparse.Namespace, model, config, depth_ratio: float, width: bool):
    """A --target-macs fraction is of the original: what is left of it after the dropped blocks
    (none when they already met it, then no channels are pruned)."""
    if not width or args.target_macs is None or args.target_macs > 1:
        return config, width
    remaining = args.target_macs / depth_ratio
    if remaining >= 1:
        LOG.info("the dropped blocks already leave %.3f of the MACs (target %g): no channels pruned",
                 depth_ratio, args.target_macs)
        return config, False
    return config_from_args(argparse.Namespace(**{**vars(args), "target_macs": remaining}), model), True


def _timed_in_turn(original, pruned, inputs, args) -> tuple[dict, list[str]]:
    """Latency of both models timed in turn, best of ``ROUNDS`` (see ``measure_in_turn``); the
    rounds-disagree warnings are printed and returned for report.json."""
    from torchslim.latency import LatencyNoiseWarning, measure_in_turn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LatencyNoiseWarning)
        latency = measure_in_turn({"original": original, "pruned": pruned}, inputs, threads=args.threads,
                                  rounds=ROUNDS, warmup=5, repeats=args.repeats)
    noise = []
    for record in caught:
        if issubclass(record.category, LatencyNoiseWarning):
            noise.append(str(record.message))
        else:
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
    for message in noise:
        print_warning(message)
    return latency, noise


def _write_checkpoint(args: argparse.Namespace, model, plan=None) -> None:
    """The pruned model as a torchslim checkpoint that records how to rebuild its original:
    ``plan`` (a plan or a result), or else its pruning history (a model loaded from a checkpoint
    DIR keeps that checkpoint's steps too)."""
    import torchslim
    from torchslim.cli._model_spec import parse_json, source_metadata

    source = source_metadata(args.model, parse_json(args.model_kwargs, "--model-kwargs"), args.input,
                             parse_json(args.kwargs, "--kwargs"), args.dtype)
    try:
        torchslim.save(model, args.out, plan, metadata={"source": source})
    except (OSError, torchslim.CheckpointError) as exc:
        raise CliError(f"cannot write the checkpoint to {args.out}: {exc}") from None


def _export_onnx(model, inputs, path: Path) -> dict:
    from torchslim.io import OnnxCheckError, export_onnx

    try:
        return export_onnx(model, inputs, path).to_dict()
    except (ImportError, RuntimeError) as exc:  # OnnxCheckError is a RuntimeError
        report: dict[str, Any] = exc.report.to_dict() if isinstance(exc, OnnxCheckError) else {"ok": False}
        report["message"] = str(exc).splitlines()[0]
        return report


def exactness_line(summary: dict) -> str:
    """Whether the pruned model equals the zeroed original (the original, after removing
    experts), with the deviation measured."""
    if summary.get("compared_with") == "original":
        removed = sum(map(len, summary["experts_removed"].values()))
        difference = f"max |difference| {summary['max_abs_error']:.3g}"
        if summary["exact"]:
            return f"exact: {removed} expert(s) removed, equals the original ({difference})"
        return (f"NOT exact: {removed} expert(s) removed, differs from the original by {summary['deviation']:.3g} "
                f"(relative L2 error; {difference})")
    deviation = f"max |difference| {summary['max_abs_error']:.3g}, relative {summary['max_rel_error']:.3g}"
    if summary["exact"]:
        note = f"; {one_line(summary['exactness_note'])}" if summary.get("exactness_note") else ""
        return f"exact: equals the original with the removed channels zeroed ({deviation}{note})"
    return f"NOT exact: differs from the original with the removed channels zeroed ({deviation})"


def _print_table(summary: dict) -> None:
    from rich.table import Table

    table = Table(title="before / after")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")
    for key in ("params", "macs", "size_bytes"):
        b, a = summary[key]
        table.add_row(key, f"{b:,}", f"{a:,}", f"{a / b:.3f}" if b else "-")
    o, p = summary["latency"]["original"], summary["latency"]["pruned"]
    spread = lambda s: f"{s['median_ms']:.2f} ({s['p10_ms']:.2f}-{s['p90_ms']:.2f})"  # noqa: E731
    table.add_row("latency ms (p10-p90)", spread(o), spread(p),
                  f"{p['median_ms'] / o['median_ms']:.3f}" if o["median_ms"] else "-")
    console = make_console()
    console.print(table)
    rounds = lambda s: "/".join(f"{m:.2f}" for m in s["round_medians_ms"])  # noqa: E731
    console.print(f"latency: {o['threads']} thread(s), timed in turn, best of {len(o['round_medians_ms'])} rounds "
                  f"(round medians: original {rounds(o)}, pruned {rounds(p)} ms)"
                  + ("; the rounds disagree: the machine was busy" if summary["latency_warnings"] else ""),
                  soft_wrap=True, highlight=False)
    console.print(exactness_line(summary), soft_wrap=True, highlight=False)
    console.print(f"checkpoint: {summary['checkpoint']} (model.safetensors, plan.json, meta.json, report.json"
                  + (", model.onnx" if "onnx" in summary else "") + "); use it as MODEL, or torchslim.load(DIR, model)",
                  soft_wrap=True, highlight=False, markup=False)
