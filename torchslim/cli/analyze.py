"""``torchslim analyze MODEL --input SHAPE [...]``: where the params, MACs and time of a model go.

Prints the roll-up by module prefix at ``--depth``, the ``--top`` heaviest leaf layers and
the totals as rich tables; ``--json FILE`` writes the full report
(``AnalysisReport.from_json`` reads it back).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from torchslim.cli._common import add_model_arguments, make_console, model_and_inputs
from torchslim.cli._errors import CliError

EPILOG = """examples:
  torchslim analyze torchvision:resnet18 --input 1,3,224,224 --top 10 --json report.json
  torchslim analyze torchslim:modnet --input 1,3,512,512 --kwargs '{"inference": false}' --depth 1
  torchslim analyze hf:bert --input 1,128 --model-kwargs '{"num_hidden_layers": 4}'
  torchslim analyze models/net.py:Net --input 1,3,32,32 --input 1,10 --no-latency

MACs: 1 MAC = 2 FLOPs; convolutions and matrix products as torch.utils.flop_counter counts
them, attention QK^T + AV, bilinear resize 4 per output element, average pooling 1 per
element read, elementwise ops and norms 0. A torch.save'd MODEL file is unpickled: only
load files you trust."""


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="params, MACs, activations and latency per layer",
                       description="Per-layer params, MACs, output shapes, activation bytes and measured latency.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--top", type=int, default=15, metavar="N", help="heaviest leaf layers to list (default 15)")
    p.add_argument("--depth", type=int, default=1, metavar="D", help="roll-up depth by module prefix (default 1)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    p.add_argument("--no-latency", action="store_true", help="skip timing (MACs and sizes only)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per round; the median is reported (default 5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="timing rounds; the least-disturbed is reported, and rounds that disagree are warned "
                        "about (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads while timing (default 1: with as many threads as cores, any other "
                        "busy process stalls every parallel op)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from torchslim.analysis import analyze

    if args.top < 0:
        raise CliError(f"--top must be >= 0, got {args.top}")
    if args.depth < 1:
        raise CliError(f"--depth must be >= 1, got {args.depth}")
    if args.warmup < 0 or args.repeats < 1 or args.rounds < 1:
        raise CliError(f"--warmup must be >= 0, --repeats and --rounds >= 1, got {args.warmup}, {args.repeats} "
                       f"and {args.rounds}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    model, inputs = model_and_inputs(args)
    report = analyze(model, inputs, latency=not args.no_latency, warmup=args.warmup, repeats=args.repeats,
                     threads=args.threads, rounds=args.rounds)
    console = make_console()
    report.render(console, top=args.top, depth=args.depth)
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(report.to_json())
        except OSError as exc:
            raise CliError(f"cannot write --json {args.json}: {exc.strerror or exc}") from None
        console.print(f"report written to {args.json}")
    return 0
