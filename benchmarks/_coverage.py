"""Shared by the coverage sweeps: prune one model with the library's defaults and say how exact it is.

A row records whether the pruned model equals the zeroed original (``verify`` with the same
dtype-based tolerances ``prune_`` uses), and where inexact groups (channels feeding LayerNorm /
softmax statistics) were pruned, how far the output moved (``PruneResult.inexact_deviation``,
relative L2 error against the zeroed original), plus the warnings the call raised.
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torchslim


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--ratio / --target-macs and --exact-only {default,true,false} for a sweep."""
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--target-macs", type=float, default=None,
                        help="prune to this fraction of the MACs instead of a ratio per group")
    parser.add_argument("--exact-only", choices=("default", "true", "false"), default="default",
                        help="PruneConfig.exact_only: default (None: exact groups first), true or false")


def config_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"exact_only": {"default": None, "true": True, "false": False}[args.exact_only]}
    if args.target_macs is not None:
        kwargs["target_macs"] = args.target_macs
    else:
        kwargs["ratio"] = args.ratio
    return kwargs


def config_flags(args: argparse.Namespace) -> list[str]:
    """The same settings as command-line flags, for a sweep's child processes."""
    flags = ["--ratio", str(args.ratio), "--exact-only", args.exact_only]
    return flags + (["--target-macs", str(args.target_macs)] if args.target_macs is not None else [])


def prune_and_check(model, inputs, kwargs: dict) -> dict:
    """Prune ``model`` in place with ``PruneConfig(**kwargs)``; time it, verify it, record deviations."""
    original = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        result = torchslim.prune_(model, inputs, torchslim.PruneConfig(**kwargs))
        seconds = time.perf_counter() - start
    report = torchslim.verify(original, model, inputs, result.plan)
    return {
        "ok": True, "pruned": bool(result.plan), "seconds": round(seconds, 2),
        "params_ratio": result.params_after / result.params_before,
        "macs_ratio": result.macs_after / max(result.macs_before, 1),
        "exact": bool(report.ok), "max_abs_error": report.max_abs_error, "max_rel_error": report.max_rel_error,
        "inexact_groups": len(result.inexact_groups), "inexact_deviation": result.inexact_deviation,
        "retries": len(result.skipped),
        "warnings": sorted({w.category.__name__ for w in caught if issubclass(w.category, UserWarning)}),
    }


def exactness(row: dict) -> str:
    """'exact', 'dev 0.123' (inexact groups pruned, measured deviation) or 'NOT exact'."""
    if not row.get("ok"):
        return "-"
    if row.get("exact"):
        return "exact"
    if row.get("inexact_deviation") is not None:
        return f"dev {row['inexact_deviation']:.3f}"
    return "NOT exact"


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r.get("ok")]
    return {"total": len(rows), "ok": len(ok), "pruned": sum(bool(r.get("pruned")) for r in ok),
            "exact": sum(bool(r.get("exact")) for r in ok),
            "inexact_with_deviation": sum(not r.get("exact") and r.get("inexact_deviation") is not None for r in ok),
            "not_exact_unexplained": sum(not r.get("exact") and r.get("inexact_deviation") is None for r in ok),
            "failed": len(rows) - len(ok)}
