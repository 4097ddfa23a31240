"""Property sweep: prune many random networks and check each one is exact.

Runs the random-network generator of ``tests/test_property.py`` (shared through
``tests/archs.py``) for many more examples than the hypothesis test does, driven by
``random.Random`` so every case is reproducible from ``--seed`` and its index. Each
network is pruned with ``criterion="random"``, a random ratio in [0.1, 0.7], a random seed
and round_to, then checked: forward runs, output shapes unchanged, params/MACs accounting,
the plan matches the tensors, module attributes follow the tensors, and
``torchslim.verify`` equals the zeroed original. ``literal`` cases contain a block with a
hard-coded channel count and may instead raise, with the model left untouched.

Prints rich tables (by family, by failed stage, by op kind) and writes
``benchmarks/results/property_sweep.json`` with every failure's spec for reproduction.

Usage::

    python benchmarks/property_sweep.py --examples 500
    python benchmarks/property_sweep.py --family token --examples 200 --seed 3
    python benchmarks/property_sweep.py --index 17 --seed 0        # re-run one case verbosely
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.archs import RandomChooser, describe_spec, generate_cnn_spec, generate_token_spec, op_kinds  # noqa: E402
from tests.test_property import check_case  # noqa: E402

FAMILIES = ("cnn", "token", "literal")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "property_sweep.json"


def make_case(seed: int, index: int, family: str, max_ops: int) -> dict[str, Any]:
    """The spec and pruning parameters of case ``index`` (deterministic in seed, index, family)."""
    rng = random.Random(f"torchslim-sweep-{seed}-{index}-{family}")
    chooser = RandomChooser(rng)
    if family == "token":
        spec = generate_token_spec(chooser, max_ops=max(1, max_ops // 2 + 1))
    else:
        spec = generate_cnn_spec(chooser, max_ops=max_ops, literal=family == "literal")
    return {"spec": spec, "ratio": round(rng.uniform(0.1, 0.7), 4), "seed": rng.randrange(2**16),
            "round_to": rng.choice((1, 1, 2, 4)), "family": family}


def family_of(index: int, family: str) -> str:
    return FAMILIES[index % len(FAMILIES)] if family == "all" else family


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    outcome = check_case(case["spec"], case["ratio"], case["seed"], case["round_to"],
                         allow_failure=case["family"] == "literal")
    return outcome


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_family: dict[str, dict[str, Any]] = {}
    for fam in sorted({r["family"] for r in records}):
        rs = [r for r in records if r["family"] == fam]
        pruned = [r for r in rs if r["pruned"]]
        reductions = [1 - r["params_after"] / r["params_before"] for r in pruned if r["params_before"]]
        by_family[fam] = {
            "examples": len(rs),
            "passed": sum(r["ok"] for r in rs),
            "failed": sum(not r["ok"] for r in rs),
            "raised_untouched": sum(1 for r in rs if r["ok"] and r["raised"]),
            "pruned": len(pruned),
            "mean_param_reduction": round(sum(reductions) / len(reductions), 4) if reductions else 0.0,
            "mean_seconds": round(sum(r["seconds"] for r in rs) / len(rs), 4),
            "max_abs_error": max((r["max_abs_error"] or 0.0) for r in rs),
        }
    stages = collections.Counter(r["stage"] for r in records if not r["ok"])
    ops_total: collections.Counter = collections.Counter()
    ops_failed: collections.Counter = collections.Counter()
    for r in records:
        for kind in set(r["ops"]):
            ops_total[kind] += 1
            ops_failed[kind] += not r["ok"]
    by_op = {k: {"examples": n, "failed": ops_failed[k], "fail_rate": round(ops_failed[k] / n, 4)}
             for k, n in ops_total.items()}
    return {"examples": len(records), "passed": sum(r["ok"] for r in records),
            "failed": sum(not r["ok"] for r in records), "by_family": by_family,
            "failed_by_stage": dict(stages), "by_op": dict(sorted(by_op.items(), key=lambda kv: (-kv[1]["fail_rate"], kv[0])))}


def print_tables(console: Console, summary: dict[str, Any], failures: list[dict[str, Any]], show: int) -> None:
    t = Table(title=f"property sweep: {summary['passed']}/{summary['examples']} exact")
    for col in ("family", "examples", "passed", "failed", "raised (untouched)", "pruned", "mean param cut",
                "mean s", "max |err|"):
        t.add_column(col, justify="right" if col != "family" else "left")
    for fam, s in summary["by_family"].items():
        t.add_row(fam, str(s["examples"]), str(s["passed"]), f"[red]{s['failed']}[/red]" if s["failed"] else "0",
                  str(s["raised_untouched"]), str(s["pruned"]), f"{s['mean_param_reduction']:.1%}",
                  f"{s['mean_seconds']:.3f}", f"{s['max_abs_error']:.2e}")
    console.print(t)
    if summary["failed_by_stage"]:
        t = Table(title="failures by stage")
        t.add_column("stage")
        t.add_column("count", justify="right")
        for stage, n in sorted(summary["failed_by_stage"].items(), key=lambda kv: -kv[1]):
            t.add_row(stage, str(n))
        console.print(t)
    t = Table(title="op kinds (examples containing the op)")
    for col in ("op", "examples", "failed", "fail rate"):
        t.add_column(col, justify="right" if col != "op" else "left")
    for op, s in summary["by_op"].items():
        rate = f"{s['fail_rate']:.0%}"
        t.add_row(op, str(s["examples"]), str(s["failed"]), f"[red]{rate}[/red]" if s["failed"] else rate)
    console.print(t)
    for f in failures[:show]:
        console.print(f"[red]#{f['index']} {f['family']}[/red] stage={f['stage']}: {f['message']}")
        console.print(f"   {f['describe']}", markup=False, highlight=False)
        console.print(f"   ratio={f['ratio']} seed={f['prune_seed']} round_to={f['round_to']} "
                      f"exact_only={f['exact_only']}  (re-run: --index {f['index']} --family {f['sweep_family']}"
                      f" --seed {f['sweep_seed']})", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=300, help="number of random networks (default 300)")
    parser.add_argument("--family", choices=FAMILIES + ("all",), default="all",
                        help="cnn, token, literal (cnn with a hard-coded channel count), or all (round-robin)")
    parser.add_argument("--seed", type=int, default=0, help="sweep seed: case i is determined by (seed, i, family)")
    parser.add_argument("--max-ops", type=int, default=10, help="maximum blocks per network")
    parser.add_argument("--index", type=int, default=None, help="run only case INDEX and print its details")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--show-failures", type=int, default=10, help="failures to print (default 10)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any case fails")
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough for the tables
        console = Console(width=140)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

    if args.index is not None:
        fam = family_of(args.index, args.family)
        case = make_case(args.seed, args.index, fam, args.max_ops)
        console.print(describe_spec(case["spec"]), markup=False, highlight=False)
        console.print_json(json.dumps(case["spec"]))
        outcome = run_case(case)
        console.print(outcome, markup=False, highlight=False)
        if outcome.get("traceback"):
            console.print(outcome["traceback"], markup=False, highlight=False)
        return 0 if outcome["ok"] else 1

    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    start = time.perf_counter()
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console, transient=True) as progress:
        task = progress.add_task("pruning random networks", total=args.examples, status="")
        for i in range(args.examples):
            fam = family_of(i, args.family)
            case = make_case(args.seed, i, fam, args.max_ops)
            outcome = run_case(case)
            record = {"index": i, "family": fam, "ops": op_kinds(case["spec"]), **{k: outcome[k] for k in (
                "ok", "stage", "pruned", "raised", "params_before", "params_after", "macs_before", "macs_after",
                "max_abs_error", "seconds", "exact_only")}}
            records.append(record)
            if not outcome["ok"]:
                failures.append({"index": i, "family": fam, "sweep_family": args.family, "sweep_seed": args.seed,
                                 "stage": outcome["stage"], "message": outcome["message"],
                                 "describe": describe_spec(case["spec"]), "spec": case["spec"], "ratio": case["ratio"],
                                 "prune_seed": case["seed"], "round_to": case["round_to"],
                                 "exact_only": outcome["exact_only"], "traceback": outcome.get("traceback")})
            progress.update(task, advance=1, status=f"[red]{len(failures)} failed[/red]" if failures else "")
    elapsed = time.perf_counter() - start

    summary = summarize(records)
    print_tables(console, summary, failures, args.show_failures)
    console.print(f"{args.examples} examples in {elapsed:.1f}s")
    payload = {
        "meta": {"examples": args.examples, "family": args.family, "seed": args.seed, "max_ops": args.max_ops,
                 "elapsed_s": round(elapsed, 2), "torch": torch.__version__, "python": platform.python_version(),
                 "platform": platform.platform(), "threads": torch.get_num_threads(),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
        "summary": summary,
        "failures": failures[:500],
        "cases": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(args.out)
    console.print(f"wrote {args.out}")
    return 1 if args.strict and failures else 0


if __name__ == "__main__":
    sys.exit(main())
