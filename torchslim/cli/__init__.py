"""The ``torchslim`` command.

Subcommands plug in through :data:`COMMANDS` (or :func:`register_command`): each is a
module exposing ``add_parser(subparsers)`` (adds its parser to the ``argparse``
sub-parsers) and ``run(args) -> int``. ``main`` turns a :class:`CliError` (and argparse's
usage errors) into one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from torchslim.cli._errors import EXIT_INTERNAL, EXIT_USAGE, CliError, one_line, print_error, show_warnings_on_one_line
from torchslim.cli._model_spec import source_metadata as source_metadata  # shared with torchslim.demo (saved-file provenance)

#: subcommand name -> module implementing it (``add_parser`` + ``run``), in help order.
COMMANDS: dict[str, str] = {
    "analyze": "torchslim.cli.analyze",
    "prune": "torchslim.cli.prune",
    "search": "torchslim.cli.search",
    "rewrite": "torchslim.cli.rewrite",
    "bench": "torchslim.cli.bench",
    "compress": "torchslim.cli.compress",
    "slim": "torchslim.cli.slim",
    "autoslim": "torchslim.cli.autoslim",
    "demo": "torchslim.cli.demo",
}


def register_command(name: str, module: str) -> None:
    """Make ``torchslim NAME`` run ``module.run(args)``; ``module.add_parser(sub)`` declares its flags."""
    COMMANDS[name] = module


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors become a :class:`CliError` (one line, exit code 2)."""

    def error(self, message: str):  # argparse API
        raise CliError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from torchslim import __version__

    parser = _Parser(prog="torchslim", description="Analyse, prune and slim PyTorch models.")
    parser.add_argument("--version", action="version", version=f"torchslim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what the library skips or falls back on (ops without a rule, rolled-back removals)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input, 1 unexpected failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.verbose:
            logging.basicConfig(level=logging.INFO, format="torchslim: %(message)s")
        run = getattr(args, "run", None) or importlib.import_module(COMMANDS[args.command]).run
        with warnings.catch_warnings():
            show_warnings_on_one_line()
            return int(run(args) or 0)
    except CliError as exc:
        if debug:
            raise
        print_error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except Exception as exc:  # a bug in torchslim or a model: one line, details with --debug
        if debug:
            raise
        print_error(f"unexpected {type(exc).__name__}: {one_line(str(exc))} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL
