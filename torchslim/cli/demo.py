"""``torchslim demo [--out DIR] [--seed N] [--quick]``: train a digits CNN, prune it iteratively
to <= 50% of its MACs with distillation fine-tuning, recalibrate BatchNorm, write a report."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a small CNN on bundled digits, prune it to <= 50%% MACs, report",
                       description="Train DigitsCNN on scikit-learn's bundled digits, prune it iteratively to "
                                   "--target-macs of its MACs with distillation fine-tuning between steps, "
                                   "recalibrate BatchNorm, and write report.json, report.md, plot.png (when matplotlib "
                                   "is installed), and the pruned model as a torchslim checkpoint (pruned/) into --out.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed for the data split, initialisation and shuffling")
    p.add_argument("--quick", action="store_true", help="train and time less (a few seconds)")
    p.add_argument("--steps", type=int, default=None, help="pruning steps (default: 4, or 2 with --quick)")
    p.add_argument("--target-macs", type=float, default=0.5, help="final MACs as a fraction of the original (default 0.5)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from torchslim.cli._errors import CliError
    from torchslim.demo import run_demo

    if not 0 < args.target_macs < 1:
        raise CliError(f"--target-macs must be a fraction in (0, 1), got {args.target_macs}")
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    try:
        run_demo(args.out, seed=args.seed, quick=args.quick, steps=args.steps, target_macs=args.target_macs)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] == "sklearn":
            raise CliError("torchslim demo trains on scikit-learn's bundled digits: pip install 'torchslim[demo]'") \
                from None
        raise
    return 0
