"""``torchslim analyze MODEL --input ...``: per-layer params, MACs, activations and latency."""
from __future__ import annotations

import argparse
from pathlib import Path

from torchslim.cli._common import add_model_arguments, model_and_inputs


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="where the params, MACs and time of a model go")
    add_model_arguments(p)
    p.add_argument("--top", type=int, default=15, help="heaviest layers to list")
    p.add_argument("--depth", type=int, default=1, help="roll-up depth by module prefix")
    p.add_argument("--json", type=Path, help="write the full report as JSON")
    p.add_argument("--no-latency", action="store_true", help="skip timing")
    p.add_argument("--threads", type=int, help="torch threads for timing")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from torchslim.analysis import analyze

    model, inputs = model_and_inputs(args)
    report = analyze(model, inputs, latency=not args.no_latency, threads=args.threads)
    report.render(top=args.top, depth=args.depth)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(report.to_json())
    return 0
