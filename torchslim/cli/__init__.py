"""The ``torchslim`` command: subcommands register through ``add_parser`` in their own modules."""
from __future__ import annotations

import argparse
import importlib
import sys

from torchslim.cli._errors import CliError

SUBCOMMANDS = ("analyze", "prune", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchslim", description="Analyse, prune and slim PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"torchslim.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except CliError as exc:
        if debug:
            raise
        print(f"torchslim: error: {exc}", file=sys.stderr)
        return 2
