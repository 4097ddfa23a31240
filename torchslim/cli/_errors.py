"""CLI errors: one line on stderr and exit code 2; the traceback only with --debug."""
from __future__ import annotations


class CliError(Exception):
    """A user-facing error: bad model spec, missing file, rejected input shape, malformed JSON."""
