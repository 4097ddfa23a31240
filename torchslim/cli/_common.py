"""Arguments shared by commands that take a MODEL and its example inputs."""
from __future__ import annotations

import argparse
import json

from torchslim.cli._errors import CliError
from torchslim.cli._model_spec import (SPEC_HELP, DTYPES, check_runs, load_model, make_inputs, parse_dtype,
                                       parse_json, parse_shape, recorded_source)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --input (repeatable), --dtype, --kwargs, --model-kwargs, --debug."""
    parser.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    parser.add_argument("--input", action="append", metavar="SHAPE",
                        help="input shape, e.g. 1,3,224,224; repeat for several positional inputs. Hugging Face "
                             "token models: the shape of input_ids, e.g. 1,16. Required, except for a torchslim "
                             "checkpoint written by 'torchslim prune', which records its shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the model and its float inputs (default float32)")
    parser.add_argument("--kwargs", metavar="JSON", help="keyword arguments for forward, e.g. '{\"inference\": false}'")
    parser.add_argument("--model-kwargs", metavar="JSON",
                        help="keyword arguments for the model's constructor (the config for hf:TYPE)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def model_and_inputs(args: argparse.Namespace):
    """Parse the shared flags, build the model and its inputs, and check the model accepts them."""
    if not args.input:
        recorded = recorded_source(args.model)
        if not recorded.get("inputs"):
            raise CliError("--input is required (e.g. --input 1,3,224,224)")
        args.input = list(recorded["inputs"])
        if args.kwargs is None and recorded.get("kwargs"):
            args.kwargs = json.dumps(recorded["kwargs"])
    shapes = [parse_shape(s) for s in args.input]
    dtype = parse_dtype(getattr(args, "dtype", None))
    kwargs = parse_json(args.kwargs, "--kwargs")
    model_kwargs = parse_json(args.model_kwargs, "--model-kwargs")
    model = load_model(args.model, model_kwargs)
    if dtype.is_floating_point and any(p.is_floating_point() for p in model.parameters()):
        model = model.to(dtype)
    inputs = make_inputs(model, shapes, dtype, kwargs)
    check_runs(model, inputs, shapes)
    return model, inputs


def add_pruning_arguments(parser: argparse.ArgumentParser, *, latency_target: bool = True) -> None:
    """How much and how to prune: one of --ratio/--target-macs/--target-latency/--recipe, plus options."""
    from torchslim.criteria import CRITERIA

    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, help="fraction of each group's channels to remove")
    how.add_argument("--target-macs", type=float, help="MACs to reach: fraction of the original (<=1) or absolute")
    if latency_target:
        how.add_argument("--target-latency", type=float, help="latency to reach: fraction of the measured original")
    how.add_argument("--recipe", metavar="FILE", help="YAML/JSON recipe: PruneConfig fields plus NNI-style rules")
    parser.add_argument("--criterion", choices=sorted(CRITERIA), default="l1")
    parser.add_argument("--round-to", default="1", help="keep multiples of N channels, or 'latency'")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="keep this module's outputs")
    parser.add_argument("--exact-only", action="store_true",
                        help="never prune groups coupled to normalisation statistics (by default they are "
                             "pruned only when a target cannot be met without them)")
    parser.add_argument("--latency-aware", action="store_true",
                        help="rank by importance per millisecond saved; with --target-macs, also time the "
                             "removals ranked by time saved per MAC, by importance per MAC and uniform widths "
                             "(multiples of 8/16) at the same MACs, and keep the fastest")
    parser.add_argument("--threads", type=int, default=1, help="threads for latency measurement")
    parser.add_argument("--latency-runtime", choices=("torch", "onnxruntime"), default=None,
                        help="runtime the latency table is measured on (default: --runtime where the command "
                             "has one, else torch)")


def config_from_args(args: argparse.Namespace, model):
    """The PruneConfig the flags describe; a bad value is a one-line CliError naming the field."""
    import torchslim
    from torchslim.pruning import config_from_recipe

    round_to = args.round_to if args.round_to == "latency" else _int(args.round_to, "--round-to")
    fields = dict(criterion=args.criterion, round_to=round_to, exclude=tuple(args.exclude),
                  exact_only=args.exact_only or None, latency_aware=args.latency_aware, latency_threads=args.threads,
                  latency_runtime=args.latency_runtime or getattr(args, "runtime", None) or "torch")
    try:
        if args.recipe:
            return config_from_recipe(model, args.recipe)
        return torchslim.PruneConfig(ratio=args.ratio or 0.5, target_macs=args.target_macs,
                                     target_latency=getattr(args, "target_latency", None), **fields)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CliError(f"{flag} takes an integer or 'latency', got '{text}'") from None
