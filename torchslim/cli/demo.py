"""``torchslim demo [--out DIR]``: train, analyse, prune and fine-tune a digits CNN; write a report."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a small CNN on bundled digits, prune it to <= 50%% MACs, report")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from torchslim.demo import run_demo

    run_demo(args.out, seed=args.seed)
    return 0
