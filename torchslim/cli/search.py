"""``torchslim search MODEL --input ... --method sensitivity|netadapt|sa|autocompress|amc --target-macs F --evaluator FILE.py:FN --out DIR``."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from torchslim.cli._common import add_model_arguments, make_console, model_and_inputs
from torchslim.cli._errors import CliError, one_line

METHODS = ("sensitivity", "netadapt", "sa", "autocompress", "amc")

EPILOG = """examples:
  torchslim search torchslim:digits_cnn --input 1,1,8,8 --method sensitivity --target-macs 0.3 \\
      --evaluator eval.py:accuracy --out searched/
  torchslim search nets.py:Net --input 1,3,32,32 --method netadapt --target-latency 0.5 \\
      --evaluator nets.py:accuracy --finetune nets.py:finetune --max-evals 200 --out n/
  torchslim search nets.py:Net --input 1,3,32,32 --method sa --target-macs 0.5 --evaluator nets.py:accuracy \\
      --workers 2 --out n/              # evaluations as Ray tasks (pip install 'torchslim[ray]')
  torchslim search nets.py:Net ... --out n/ --resume          # continue n/history.jsonl after a crash
  torchslim search nets.py:Net --input 1,3,32,32 --method autocompress --target-macs 0.25 --rounds 2 \\
      --evaluator nets.py:accuracy --admm-train nets.py:admm_train --data nets.py:calibration --out ac/
  torchslim search nets.py:Net --input 1,3,32,32 --method amc --target-macs 0.5 --episodes 300 --warmup 100 \\
      --evaluator nets.py:accuracy --data nets.py:calibration --out amc/    # writes history.jsonl.policy.pt too

--evaluator names a function model -> float, higher is better (e.g. accuracy on held-out batches;
it must not train on them); --finetune a function (model, budget) -> None run on a copy of every
candidate before it is scored. DIR receives the pruned checkpoint (usable as MODEL by every
command), recipe.yaml (the chosen per-group ratios: 'torchslim prune MODEL --recipe DIR/recipe.yaml'
re-applies them), history.jsonl (every evaluation), search.json and, for sensitivity, the
analysis (sensitivity.json, sensitivity.png). --data names batches (or a function returning them)
that BatchNorm statistics are re-estimated on before each score.

autocompress runs --rounds rounds of simulated annealing (--max-evals evaluations per round) then
ADMM training at the round's winner through --admm-train, a function (model, admm) -> None: your
training loop with admm.penalty() added to the loss and admm.step() after each optimizer step; the
channels ADMM drove to zero are then removed. DIR receives the compressed model (its weights are
the retrained ones, so there is no recipe), round<N>/ (each round's model and summary; --resume
loads finished rounds), round<N>.jsonl (each round's evaluations) and search.json."""


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search per-layer pruning ratios that meet a budget, scoring candidates",
                       description="Search the per-group ratios of MODEL that meet a MACs, params or latency budget\n"
                                   "with the best --evaluator score (sensitivity analysis, NetAdapt or simulated\n"
                                   "annealing), then prune the winner and write it into --out.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--method", choices=METHODS, required=True, help="search method")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-macs", type=float, help="MACs budget: fraction of the original (<=1) or absolute")
    budget.add_argument("--target-params", type=float, help="parameter budget: fraction (<=1) or absolute")
    budget.add_argument("--target-latency", type=float,
                        help="latency budget: fraction of the original, predicted by the per-layer latency table")
    p.add_argument("--evaluator", required=True, metavar="FILE.py:FN", help="function model -> float, higher is better")
    p.add_argument("--finetune", metavar="FILE.py:FN", help="function (model, budget) -> None: short fine-tune")
    p.add_argument("--finetune-budget", metavar="JSON", help="the budget handed to --finetune (any JSON value)")
    p.add_argument("--criterion", default="l1", help="orders channels inside a group (weight-only criteria)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="keep this module's outputs")
    p.add_argument("--round-to", type=int, default=None, help="keep multiples of N channels (default 1)")
    p.add_argument("--exact-only", action="store_true", help="never prune groups coupled to normalisation statistics")
    p.add_argument("--max-evals", type=int, help="stop after N evaluations (the best so far is kept)")
    p.add_argument("--time-limit", type=float, help="stop after S seconds (the best so far is kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (SA proposals; same seed, same result)")
    p.add_argument("--data", metavar="FILE.py:NAME", help="batches BatchNorm statistics are recalibrated on")
    p.add_argument("--admm-train", metavar="FILE.py:FN", help="autocompress: function (model, admm) -> None")
    p.add_argument("--rounds", type=int, default=2, help="autocompress: rounds to the budget (default 2)")
    p.add_argument("--episodes", type=int, default=300, help="amc: episodes (evaluations; default 300)")
    p.add_argument("--warmup", type=int, default=100, help="amc: random episodes first (default 100)")
    p.add_argument("--initial-cut", type=float, default=0.015, help="netadapt: first iteration's cut (default 0.015)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the latency table and timings")
    p.add_argument("--workers", type=int, default=1,
                   help="evaluate in parallel on N Ray workers (pip install 'torchslim[ray]'); default in process")
    p.add_argument("--ray-address", help="join a running Ray cluster (e.g. auto, ray://host:10001)")
    p.add_argument("--resume", action="store_true", help="continue the search recorded in DIR/history.jsonl")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--onnx", action="store_true", help="also export DIR/model.onnx, checked with onnxruntime")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from torchslim.cli._model_spec import import_attribute
    from torchslim.search import SearchInterrupted

    _check_flags(args)
    evaluate = _function(args.evaluator, "--evaluator", import_attribute)
    finetune = _function(args.finetune, "--finetune", import_attribute) if args.finetune else None
    budget = _json_value(args.finetune_budget)
    data = _batches(args.data, import_attribute) if args.data else None
    model, inputs = model_and_inputs(args)
    if args.method == "autocompress":
        return _run_autocompress(args, model, inputs, evaluate, finetune, budget, data)
    history = args.out / "history.jsonl"
    if args.resume and not history.exists():
        raise CliError(f"--resume: {history} does not exist (run once without --resume)")
    args.out.mkdir(parents=True, exist_ok=True)
    search = _make_search(args, model, inputs, evaluate, finetune, budget, data, history)
    console = make_console()
    with _Progress(search, console) as progress:
        search.on_record = progress.record
        try:
            result = search.run()
        except SearchInterrupted as exc:
            raise CliError(f"{exc} (continue with --resume)") from None
        except (ValueError, RuntimeError) as exc:
            raise CliError(one_line(str(exc))) from None
        finally:
            search.executor.close()
    pruned = result.apply_(model, inputs)
    summary = _summary(args, search, result, pruned)
    _write_outputs(args, model, inputs, search, result, pruned, summary)
    _print_table(console, args, search, result, summary)
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    for flag in ("max_evals", "workers", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise CliError(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    if args.method == "autocompress" and not args.admm_train:
        raise CliError("--method autocompress needs --admm-train FILE.py:FN (your training loop with "
                       "admm.penalty() added to the loss and admm.step() after each optimizer step)")
    if args.admm_train and args.method != "autocompress":
        raise CliError(f"--admm-train is for --method autocompress, not {args.method}")
    if args.rounds < 1:
        raise CliError(f"--rounds must be >= 1, got {args.rounds}")
    if args.method == "autocompress" and args.target_latency is not None:
        raise CliError("--method autocompress budgets MACs or parameters (--target-macs / --target-params); "
                       "for a latency budget use --method netadapt")
    if args.ray_address and args.workers == 1:
        args.workers = 2  # a cluster address means: evaluate on Ray
    from torchslim.criteria import make_importance

    try:
        needs_data = hasattr(make_importance(args.criterion), "prepare")
    except ValueError as exc:
        raise CliError(f"--criterion: {exc}") from None
    if needs_data:
        raise CliError(f"--criterion {args.criterion} measures the model on data; the search command takes "
                       "weight-only criteria (l1, l2, fpgm, bn_scale, lamp, random): use the Python API for others")


def _function(spec: str, flag: str, import_attribute) -> Any:
    _, _, value = import_attribute(spec, f"{flag} file")
    if not callable(value):
        raise CliError(f"{flag} {spec} is a {type(value).__name__}, not a function")
    return value


def _batches(spec: str, import_attribute) -> list:
    """``--data``: a list of batches, or a function returning them (inputs, or (inputs, ...) tuples)."""
    _, _, value = import_attribute(spec, "--data file", suggestable=lambda v: True)
    value = value() if callable(value) else value
    try:
        batches = list(value)
    except TypeError:
        raise CliError(f"--data {spec} is a {type(value).__name__}, not batches (a list, or a function "
                       "returning one)") from None
    if not batches:
        raise CliError(f"--data {spec} holds no batch")
    return batches


def _json_value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--finetune-budget is not JSON: {exc.msg}") from None


def _prune_config(args):
    import torchslim

    try:
        return torchslim.PruneConfig(criterion=args.criterion, exclude=tuple(args.exclude), round_to=args.round_to,
                                     exact_only=args.exact_only or None, latency_threads=args.threads)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _make_search(args, model, inputs, evaluate, finetune, budget, data, history: Path):
    from torchslim.search import AMCSearch, AnnealingSearch, NetAdaptSearch, SensitivitySearch
    from torchslim.search.executors import RayExecutor

    kwargs: dict[str, Any] = dict(target_macs=args.target_macs, target_params=args.target_params,
                                  target_latency=args.target_latency, finetune=finetune, finetune_budget=budget,
                                  max_evals=args.max_evals, time_limit=args.time_limit, seed=args.seed,
                                  config=_prune_config(args), data=data, recalibrate_bn=data is not None)
    kwargs["resume" if args.resume else "history"] = history
    if args.workers > 1:
        kwargs["executor"] = RayExecutor(workers=args.workers, address=args.ray_address, threads_per_worker=1)
    cls: Any = {"sensitivity": SensitivitySearch, "netadapt": NetAdaptSearch, "sa": AnnealingSearch,
                "amc": AMCSearch}[args.method]
    if args.method == "netadapt":
        kwargs["initial_cut"] = args.initial_cut
    if args.method == "amc":
        kwargs.update(episodes=args.episodes, warmup=args.warmup)
    try:
        return cls(model, inputs, evaluate, **kwargs)
    except (ValueError, TypeError) as exc:
        raise CliError(one_line(str(exc))) from None


def _run_autocompress(args, model, inputs, evaluate, finetune, budget, data) -> int:
    """AutoCompress: the rounds, then the compressed model (retrained weights) and the summary."""
    from torchslim.cli._model_spec import import_attribute
    from torchslim.search import AutoCompress, SearchInterrupted
    from torchslim.search.executors import RayExecutor

    admm_train = _function(args.admm_train, "--admm-train", import_attribute)
    if args.resume and not (args.out / "round1.jsonl").exists():
        raise CliError(f"--resume: {args.out} holds no autocompress run (run once without --resume)")
    executor = (RayExecutor(workers=args.workers, address=args.ray_address, threads_per_worker=1)
                if args.workers > 1 else None)
    try:
        search = AutoCompress(model, inputs, evaluate, admm_train, target_macs=args.target_macs,
                              target_params=args.target_params, rounds=args.rounds, evals_per_round=args.max_evals,
                              finetune=finetune, finetune_budget=budget, data=data, recalibrate_bn=data is not None,
                              seed=args.seed, config=_prune_config(args), executor=executor,
                              **{"resume" if args.resume else "history": args.out})
        result = search.run()
    except SearchInterrupted as exc:
        raise CliError(f"{exc} (continue with --resume)") from None
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CliError(one_line(str(exc))) from None
    finally:
        if executor is not None:
            executor.close()
    summary = {"method": "autocompress", "rounds": [r.summary() for r in result.rounds], "score": result.score,
               "macs": [result.original_macs, result.macs], "params": [result.original_params, result.params],
               "checkpoint": str(args.out)}
    from torchslim.cli.prune import _write_checkpoint

    _write_checkpoint(args, result.model, result.plan)  # rebuilt from MODEL by the rounds' removals
    if args.onnx:
        from torchslim.cli.prune import _export_onnx

        summary["onnx"] = _export_onnx(result.model, inputs, args.out / "model.onnx")
    (args.out / "search.json").write_text(json.dumps(summary, indent=2, default=str))
    console = make_console()
    macs, params = summary["macs"], summary["params"]
    for r in result.rounds:
        console.print(f"round {r.index}: goal {r.goal:.3f} of the original, MACs {r.macs:,}, params {r.params:,}, "
                      f"score {r.score:.4g}")
    console.print(f"compressed: MACs {macs[0]:,} -> {macs[1]:,} ({macs[1] / macs[0]:.3f}), params {params[0]:,} -> "
                  f"{params[1]:,}, score {result.score:.4g}; checkpoint {args.out}")
    return 0


class _Progress:
    """A bar of the evaluations (out of ``max_evals`` when known) with the best score so far."""

    def __init__(self, search, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.search, self.best = search, -math.inf
        self.progress = Progress(SpinnerColumn(), TextColumn(f"{search.method}"), BarColumn(bar_width=20),
                                 MofNCompleteColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.task: Any = None

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        self.task = self.progress.add_task("evaluating", total=self.search.max_evals)
        return self

    def record(self, record) -> None:
        if record.meets_budget and record.score > self.best:
            self.best = record.score
        best = f"best {self.best:.4g}" if math.isfinite(self.best) else "no candidate in budget yet"
        self.progress.update(self.task, completed=record.index + 1, description=best)

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _summary(args, search, result, pruned) -> dict[str, Any]:
    original = result.original
    return {
        "method": result.method, "stopped": result.stopped, "evaluations": len(result.history),
        "score": result.score, "ratios": {str(k): v for k, v in result.ratios.items()},
        "macs": [original.macs, pruned.macs_after], "params": [original.params, pruned.params_after],
        "latency_ms_predicted": [original.latency_ms, result.latency_ms],
        "checkpoint": str(args.out), "history": str(args.out / "history.jsonl"),
        "recipe": str(args.out / "recipe.yaml"),
    }


def _write_outputs(args, model, inputs, search, result, pruned, summary: dict) -> None:
    import yaml

    from torchslim.cli.prune import _export_onnx, _write_checkpoint

    _write_checkpoint(args, model, pruned)
    config = result.config
    recipe = {"criterion": config.criterion if isinstance(config.criterion, str) else "l1",
              "ratio": 0.0,  # groups not listed keep every channel
              "ratios": {int(k): float(v) for k, v in (config.ratios or {}).items()},
              "exclude": list(config.exclude), "exact_only": config.exact_only, "round_to": config.round_to,
              "latency_aware": False, "global_ranking": False}
    (args.out / "recipe.yaml").write_text(
        "# per-group ratios (group id: share of its channels removed) chosen by 'torchslim search';\n"
        "# re-apply with: torchslim prune MODEL --input ... --recipe recipe.yaml\n" + yaml.safe_dump(recipe))
    if args.method == "sensitivity" and search.analysis is not None:
        search.analysis.save(args.out / "sensitivity.json")
        plot = search.analysis.plot(args.out / "sensitivity.png")
        summary["plot"] = str(plot) if plot is not None else None
    if args.onnx:
        summary["onnx"] = _export_onnx(model, inputs, args.out / "model.onnx")
    (args.out / "search.json").write_text(json.dumps(summary, indent=2, default=str))


def _print_table(console, args, search, result, summary: dict) -> None:
    from rich.table import Table

    best = sorted((r for r in result.history if r.meets_budget), key=lambda r: -r.score)[:5]
    table = Table(title=f"{result.method}: {summary['evaluations']} evaluations ({result.stopped}); best candidates")
    for column in ("#", "score", "MACs", "params", "groups cut", "note"):
        table.add_column(column, justify="right" if column not in ("note",) else "left")
    for r in best:
        table.add_row(str(r.index), f"{r.score:.4g}", f"{r.macs / result.original.macs:.3f}",
                      f"{r.params / result.original.params:.3f}", str(len(r.ratios)), r.note)
    console.print(table)
    macs, params = summary["macs"], summary["params"]
    console.print(f"pruned: MACs {macs[0]:,} -> {macs[1]:,} ({macs[1] / macs[0]:.3f}), params {params[0]:,} -> "
                  f"{params[1]:,}, score {result.score:.4g}; checkpoint {args.out}, recipe {args.out / 'recipe.yaml'}, "
                  f"history {args.out / 'history.jsonl'}")
