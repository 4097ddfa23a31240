"""``torchslim autoslim DIR --target-macs F --evaluator FILE.py:FN --data FILE.py:NAME --out OUT``: AutoSlim
on a slimmable checkpoint."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from torchslim.cli._common import add_model_arguments, make_console, model_and_inputs
from torchslim.cli._errors import CliError, one_line
from torchslim.cli.slim import function_arg

AUTOSLIM_EPILOG = """examples:
  torchslim autoslim slim/ --target-macs 0.5 --evaluator eval.py:accuracy --data eval.py:calibration --out auto/

DIR is a slimmable checkpoint ('torchslim slim' or torchslim.slimmable.save_slimmable). --data names the
few batches BatchNorm is calibrated on for every candidate (an iterable, or a function returning one);
--evaluator a function model -> float, higher is better. OUT receives the slimmed checkpoint (usable as
MODEL by every command), history.jsonl and autoslim.json."""


def add_parser(sub) -> None:
    p = sub.add_parser("autoslim", help="greedy width search (AutoSlim) on a slimmable checkpoint under a budget",
                       description="Slim a trained slimmable checkpoint greedily, one group one step narrower at a\n"
                                   "time, keeping the best --evaluator score after BatchNorm calibration on --data,\n"
                                   "until the budget is met; write the slimmed model into --out.",
                       epilog=AUTOSLIM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-macs", type=float, help="MACs budget: fraction of the full width (<=1) or absolute")
    budget.add_argument("--target-params", type=float, help="parameter budget: fraction (<=1) or absolute")
    budget.add_argument("--target-latency", type=float, help="latency budget: fraction, per-layer latency table")
    p.add_argument("--evaluator", required=True, metavar="FILE.py:FN", help="function model -> float, higher is better")
    p.add_argument("--data", required=True, metavar="FILE.py:NAME", help="batches for BatchNorm calibration")
    p.add_argument("--step", type=float, default=0.1, help="share of a group's channels one step removes (0.1)")
    p.add_argument("--no-uniform-baseline", action="store_true",
                   help="return the greedy path's end even where the uniform width at the budget scores higher")
    p.add_argument("--max-evals", type=int, help="stop after N evaluations (the best so far is kept)")
    p.add_argument("--resume", action="store_true", help="continue the search recorded in OUT/history.jsonl")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from torchslim.cli._model_spec import import_attribute
    from torchslim.cli.prune import _write_checkpoint
    from torchslim.io import CheckpointError
    from torchslim.search import SearchInterrupted
    from torchslim.slimmable import AutoSlimSearch, load_slimmable
    from torchslim.slimmable.slimmable import copy_without_hooks

    if args.max_evals is not None and args.max_evals < 1:
        raise CliError(f"--max-evals must be >= 1, got {args.max_evals}")
    evaluate = function_arg(args.evaluator, "--evaluator", import_attribute)
    _, _, data = import_attribute(args.data, "--data file", suggestable=lambda v: True)
    data = data() if callable(data) else data
    model, inputs = model_and_inputs(args)
    try:
        slim = load_slimmable(args.model, model, inputs, weights_loaded=True)
    except (CheckpointError, ValueError) as exc:
        raise CliError(f"{args.model}: {one_line(str(exc))}") from None
    history = args.out / "history.jsonl"
    if args.resume and not history.exists():
        raise CliError(f"--resume: {history} does not exist (run once without --resume)")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        search = AutoSlimSearch(slim, inputs, evaluate, data=list(data), step=args.step,
                                uniform_baseline=not args.no_uniform_baseline, target_macs=args.target_macs,
                                target_params=args.target_params, target_latency=args.target_latency,
                                max_evals=args.max_evals, **{"resume" if args.resume else "history": history})
        result = search.run()
    except SearchInterrupted as exc:
        raise CliError(f"{exc} (continue with --resume)") from None
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CliError(one_line(str(exc))) from None
    slimmed = copy_without_hooks(slim)
    pruned = result.apply_(slimmed, inputs)
    _write_checkpoint(args, slimmed, pruned)
    original = result.original
    summary = {"evaluations": len(result.history), "stopped": result.stopped, "score": result.score,
               "macs": [original.macs, pruned.macs_after], "params": [original.params, pruned.params_after],
               "widths": {str(g): 1 - r for g, r in result.ratios.items()},
               "steps": [step.__dict__ for step in search.steps], "kept_uniform": search.kept_uniform,
               "checkpoint": str(args.out)}
    (args.out / "autoslim.json").write_text(json.dumps(summary, indent=2))
    console = make_console()
    console.print(f"autoslim: {len(result.history)} evaluations, {len(search.steps)} steps; MACs {original.macs:,} -> "
                  f"{pruned.macs_after:,} ({pruned.macs_after / original.macs:.3f}), params {original.params:,} -> "
                  f"{pruned.params_after:,}, score {result.score:.4g}"
                  f"{' (the uniform width: it scored above the greedy path)' if search.kept_uniform else ''}; "
                  f"checkpoint {args.out}")
    return 0
