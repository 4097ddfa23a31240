"""CLI errors: one line on stderr and exit code 2; the traceback only with --debug."""
from __future__ import annotations

import sys

#: Exit code for bad input (unknown model, missing file, rejected shape, malformed JSON, bad flag).
EXIT_USAGE = 2
#: Exit code for an unexpected failure inside torchslim (a bug: rerun with --debug and report it).
EXIT_INTERNAL = 1


class CliError(Exception):
    """A user-facing error: bad model spec, missing file, rejected input shape, malformed JSON."""


def one_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def print_error(message: str) -> None:
    print(f"torchslim: error: {one_line(message)}", file=sys.stderr)


def print_note(message: str) -> None:
    print(f"torchslim: note: {one_line(message)}", file=sys.stderr)


def print_warning(message: str) -> None:
    print(f"torchslim: warning: {one_line(message)}", file=sys.stderr)


def show_warnings_on_one_line() -> None:
    """Route ``warnings.warn`` to :func:`print_warning` (one line, no source excerpt); undone by
    the ``warnings.catch_warnings()`` block around the command."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # warnings API
        print_warning(f"{category.__name__}: {message}")

    warnings.showwarning = show
