"""``torchslim slim MODEL --input ... --widths 0.25,0.5,0.75,1 [--train FILE.py:FN] --out DIR``."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from torchslim.cli._common import add_model_arguments, make_console, model_and_inputs
from torchslim.cli._errors import CliError, one_line

SLIM_EPILOG = """examples:
  torchslim slim torchslim:digits_cnn --input 1,1,8,8 --width-range 0.25,1 --train train.py:sandwich --out slim/
  torchslim slim nets.py:Net --input 1,3,32,32 --widths 0.25,0.5,1 --switchable-bn --out slim/

--train names a function slim -> None that trains the slimmable model (e.g. with
torchslim.slimmable.train_sandwich). DIR receives a slimmable checkpoint (also an ordinary
checkpoint of the full-width model) and slim.json (MACs and parameters per width)."""

def add_parser(sub) -> None:
    p = sub.add_parser("slim", help="make a model slimmable (one set of weights for several widths)",
                       description="Sort MODEL's channels by importance and save it as a slimmable network that runs\n"
                                   "at every configured width; --train trains it (sandwich rule) before saving.",
                       epilog=SLIM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--widths", default="0.25,0.5,0.75,1", help="configured widths (default 0.25,0.5,0.75,1)")
    p.add_argument("--width-range", metavar="LOW,HIGH", help="any width in this range runs (US-Nets)")
    p.add_argument("--switchable-bn", action="store_true", help="a private BatchNorm per configured width (S-Nets)")
    p.add_argument("--criterion", default="l1", help="orders each group's channels (default l1)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="keep this module at full width")
    p.add_argument("--round-to", type=int, default=1, help="keep multiples of N channels (default 1)")
    p.add_argument("--train", metavar="FILE.py:FN", help="function slim -> None that trains the slimmable model")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from torchslim.cli._model_spec import import_attribute, parse_json, source_metadata
    from torchslim.slimmable import export_width, make_slimmable, save_slimmable

    widths = _floats(args.widths, "--widths")
    width_range = tuple(_floats(args.width_range, "--width-range")) if args.width_range else None
    if width_range is not None and len(width_range) != 2:
        raise CliError(f"--width-range takes LOW,HIGH, got {args.width_range!r}")
    train = function_arg(args.train, "--train", import_attribute) if args.train else None
    model, inputs = model_and_inputs(args)
    try:
        slim = make_slimmable(model, inputs, widths=tuple(widths), width_range=width_range,
                              switchable_bn=args.switchable_bn, criterion=args.criterion, exclude=tuple(args.exclude),
                              round_to=args.round_to)
    except (ValueError, TypeError) as exc:
        raise CliError(one_line(str(exc))) from None
    if train is not None:
        train(slim)
    slim.eval()
    source = source_metadata(args.model, parse_json(args.model_kwargs, "--model-kwargs"), args.input,
                             parse_json(args.kwargs, "--kwargs"), args.dtype)
    save_slimmable(slim, args.out, metadata={"source": source})
    full_params = sum(p.numel() for p in slim.model.parameters())
    rows = []
    for width in slim.config.widths:
        small = export_width(slim, width, inputs) if width < 1 else None
        params = sum(p.numel() for p in small.parameters()) if small is not None else full_params
        rows.append({"width": width, "macs": slim.macs(width), "params": params})
    summary = {"widths": rows, "groups": len(slim.groups), "left_out": {str(k): v for k, v in slim.left_out.items()},
               "checkpoint": str(args.out)}
    (args.out / "slim.json").write_text(json.dumps(summary, indent=2))
    _print_widths(make_console(), rows, slim, args.out)
    return 0


def _print_widths(console, rows: list[dict], slim, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"slimmable: {len(slim.groups)} groups narrow"
                        + (f", {len(slim.left_out)} stay at full width" if slim.left_out else ""))
    for column in ("width", "MACs", "MACs share", "params"):
        table.add_column(column, justify="right")
    full = rows[-1]["macs"] if rows[-1]["width"] == 1.0 else slim.macs(1.0)
    for row in rows:
        table.add_row(f"{row['width']:g}", f"{row['macs']:,}", f"{row['macs'] / full:.3f}", f"{row['params']:,}")
    console.print(table)
    console.print(f"slimmable checkpoint: {out}")


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) for v in values):
        raise CliError(f"{flag} takes comma-separated numbers, got {text!r}")
    return values


def function_arg(spec: str, flag: str, import_attribute) -> Any:
    _, _, value = import_attribute(spec, f"{flag} file")
    if not callable(value):
        raise CliError(f"{flag} {spec} is a {type(value).__name__}, not a function")
    return value
