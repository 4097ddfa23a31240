"""``torchslim compress MODEL --input ... [--prune 0.9] --bits conv=8,linear=5 [--finetune F.py:fn] --out DIR``."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from torchslim.cli._common import add_model_arguments, make_console, model_and_inputs
from torchslim.cli._errors import CliError, one_line

EPILOG = """examples:
  torchslim compress nets.py:LeNet --input 1,64 --prune 0.92 --bits linear=5 --out lenet/
  torchslim compress nets.py:Net --input 1,3,32,32 --prune 0.8 --bits conv=8,linear=5 --finetune train.py:tune --out n/
  torchslim compress torchvision:resnet18 --input 1,3,224,224 --bits 4 --out r18/

Deep Compression (Han et al., ICLR 2016): magnitude pruning (--prune), weight sharing by k-means
(--bits: 2**bits centroids per layer over its non-zero weights) and Huffman coding of the
cluster indices and of the relative sparse positions (--index-bits wide, filler zeros beyond).
--finetune FILE.py:fn calls fn(model, stage) after pruning (stage "pruned"; weights it moves off
zero are zeroed again) and after sharing (stage "shared"; the centroids train, zeros stay zero).
DIR/model.tsc loads with torchslim.compress.load_compressed(DIR, fresh_model), which rebuilds
the shared weights bit-exactly; the loaded model is dense: smaller on disk, not faster."""


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="deep compression: prune, share weights (k-means), Huffman-code to a file",
                       description="Prune MODEL's weights by magnitude, share each layer's weights among 2**bits\n"
                                   "k-means centroids, Huffman-code the indices and sparse positions into\n"
                                   "DIR/model.tsc, print the size per layer and stage, and check the file reloads.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prune", type=float, default=None, metavar="SPARSITY",
                   help="fraction of the smallest weights of each Conv/Linear layer to zero first (default: none)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="--prune per layer (default) or with one threshold over all layers")
    p.add_argument("--bits", default="conv=8,linear=5", metavar="SPEC",
                   help="index bits of the shared weights: N for every layer, or TYPE_OR_MODULE=N,... with "
                        "conv, linear or module names (default conv=8,linear=5, the paper's)")
    p.add_argument("--index-bits", default="conv=8,linear=5", metavar="SPEC",
                   help="width of the relative index of sparse positions (default conv=8,linear=5, the paper's)")
    p.add_argument("--init", choices=("linear", "density", "random"), default="linear",
                   help="k-means initialisation (default linear, the paper's best)")
    p.add_argument("--finetune", metavar="FILE.py:NAME",
                   help="fn(model, stage) called after pruning (stage 'pruned') and after sharing ('shared')")
    p.add_argument("--out", type=Path, required=True, help="output directory: model.tsc and report.json")
    p.set_defaults(run=run)


def parse_bits(text: str, flag: str) -> int | dict[str, int]:
    """``"5"`` -> 5; ``"conv=8,linear=5"`` -> dict; anything else a CliError naming ``flag``."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    spec: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip().lstrip("-").isdigit():
            raise CliError(f"{flag} '{text}': expected N or KEY=N,... (e.g. conv=8,linear=5), got '{part}'")
        spec[key.strip()] = int(value)
    if not spec:
        raise CliError(f"{flag} is empty")
    return spec


def run(args: argparse.Namespace) -> int:
    import torch

    from torchslim.compress import FILE_NAME, load_compressed, save_compressed, share_weights_
    from torchslim.sparsity import sparsify_

    if args.prune is not None and not 0.0 <= args.prune < 1.0:
        raise CliError(f"--prune must be in [0, 1), got {args.prune}")
    bits, index_bits = parse_bits(args.bits, "--bits"), parse_bits(args.index_bits, "--index-bits")
    finetune = _finetune(args.finetune)
    model, inputs = model_and_inputs(args)
    original = copy.deepcopy(model)
    stages: list[str] = []
    if args.prune:
        masks = sparsify_(model, args.prune, scope=args.scope)
        stages.append(f"pruned {args.prune:g} ({args.scope})")
        if finetune:
            _call(finetune, model, "pruned", args.finetune)
            masks.apply_()
    try:
        share_weights_(model, bits, init=args.init)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    stages.append("shared")
    if finetune:
        _call(finetune, model, "shared", args.finetune)
    try:
        report = save_compressed(model, args.out / FILE_NAME, index_bits)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc}") from None
    reloaded = load_compressed(args.out, copy.deepcopy(original))
    with torch.no_grad():
        model.eval(), reloaded.eval(), original.eval()
        exact = _max_difference(model, reloaded, inputs) == 0.0
        drift = _max_difference(original, reloaded, inputs)
    summary: dict[str, Any] = {"stages": stages, "file": str(args.out / "model.tsc"), "reload_exact": exact,
                               "max_abs_output_change": drift, **report.to_dict()}
    (args.out / "report.json").write_text(json.dumps(summary, indent=2))
    console = make_console()
    console.print(report.table())
    console.print(f"compression: {report.ratio:.1f}x ({report.stage_bits('dense') // 8:,} -> {report.file_bytes:,} "
                  f"bytes, header {report.header_bytes:,}); stages: {', '.join(stages)}", soft_wrap=True,
                  highlight=False)
    console.print(f"reload: {'bit-exact' if exact else 'NOT exact'}; output change vs the original: max |diff| "
                  f"{drift:.3g}; load with torchslim.compress.load_compressed('{args.out}', model)",
                  soft_wrap=True, highlight=False, markup=False)
    return 0


def _finetune(spec: str | None):
    if spec is None:
        return None
    from torchslim.cli._model_spec import import_attribute

    _, _, fn = import_attribute(spec, "--finetune file")
    if not callable(fn):
        raise CliError(f"--finetune {spec} is a {type(fn).__name__}, not a function fn(model, stage)")
    return fn


def _call(fn, model, stage: str, spec: str) -> None:
    try:
        fn(model, stage)
    except Exception as exc:  # noqa: BLE001 - the user's fine-tuning failed: say where, one line
        raise CliError(f"--finetune {spec} failed at stage '{stage}': {type(exc).__name__}: "
                       f"{one_line(str(exc))}") from None


def _max_difference(a, b, inputs) -> float:
    """Largest absolute difference between the two models' outputs (first tensor of each)."""
    from torchslim._inputs import call_model, iter_tensors

    out_a = next(iter_tensors(call_model(a, inputs)), None)
    out_b = next(iter_tensors(call_model(b, inputs)), None)
    if out_a is None or out_b is None:
        return float("nan")
    return float((out_a.float() - out_b.float()).abs().max()) if out_a.numel() else 0.0
