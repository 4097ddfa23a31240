"""Arguments shared by commands that take a MODEL and its example inputs."""
from __future__ import annotations

import argparse
import json

from torchslim.cli._errors import CliError, one_line, print_note
from torchslim.cli._model_spec import (SPEC_HELP, DTYPES, check_runs, load_model, make_inputs, parse_dtype,
                                       parse_json, parse_shape, recorded_source)


def make_console():
    """rich console on stdout; 140 columns when stdout is not a terminal (files, CI logs)."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


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


#: criteria that take a loss: taylor needs a real one, fisher has a label-free default
LOSS_CRITERIA = ("taylor", "fisher")


def add_pruning_arguments(parser: argparse.ArgumentParser, *, latency_target: bool = True,
                          amount_required: bool = True, experts: bool = False) -> None:
    """How much and how to prune: one of --ratio/--target-macs/--target-latency/--recipe (or, with
    ``experts``, --expert-ratio: whole experts of mixture-of-experts layers), plus options
    (``amount_required=False``: the command checks that itself, as prune does with --drop-blocks)."""
    from torchslim.criteria import CRITERIA
    from torchslim.pruning.experts import IMPORTANCES

    how = parser.add_mutually_exclusive_group(required=amount_required)
    how.add_argument("--ratio", type=float, help="fraction of each group's channels to remove")
    how.add_argument("--target-macs", type=float, help="MACs to reach: fraction of the original (<=1) or absolute")
    if latency_target:
        how.add_argument("--target-latency", type=float, help="latency to reach: fraction of the measured original")
    how.add_argument("--recipe", metavar="FILE", help="YAML/JSON recipe: PruneConfig fields plus NNI-style rules")
    if experts:
        how.add_argument("--expert-ratio", type=float, metavar="R",
                         help="instead of channels, remove whole experts: this fraction of each mixture-of-experts "
                              "layer's experts (rounded down), the least routed to on --data (default: the example "
                              "input) first")
        parser.add_argument("--expert-importance", choices=IMPORTANCES, default="frequency",
                            help="with --expert-ratio: rank experts by how often the router puts them in its top-k "
                                 "(frequency, the default) or by the router probability summed there")
    parser.add_argument("--criterion", choices=sorted(CRITERIA), default="l1",
                        help="importance criterion (default l1); taylor, fisher, apoz and mean_activation "
                             "measure the model on --data")
    parser.add_argument("--data", metavar="FILE.py:NAME",
                        help="batches for the data-driven criteria: NAME is an iterable of batches (a list, a "
                             "DataLoader) or a function returning one; each batch is the model's input or an "
                             "(input, target) pair")
    parser.add_argument("--loss", metavar="FILE.py:NAME",
                        help="loss_fn(output, batch) -> scalar tensor for taylor (required) and fisher (default: "
                             "torchslim.criteria.random_projection_loss(), which needs no labels)")
    parser.add_argument("--round-to", default=None,
                        help="keep multiples of N channels, or 'latency' (the measured fastest width near the "
                             "exact one); default 'latency' with a MACs target and the latency table, else 1")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="keep this module's outputs")
    parser.add_argument("--exact-only", action="store_true",
                        help="never prune groups coupled to normalisation statistics (by default they are "
                             "pruned only when a target cannot be met without them)")
    parser.add_argument("--latency-aware", action="store_true",
                        help="rank by importance per millisecond saved; with --target-macs, also time the "
                             "removals ranked by time saved per MAC, by importance per MAC and uniform widths "
                             "(multiples of 8/16) at the same MACs, and keep the fastest (on by default with a "
                             "MACs or params target)")
    parser.add_argument("--no-latency-table", action="store_true",
                        help="with a MACs or params target, measure no per-layer latency table (otherwise measured once "
                             "per machine, runtime and thread count, cached under ~/.cache/torchslim or "
                             "$TORCHSLIM_CACHE): use the Python API's default, a MACs target spent where the time "
                             "estimated from shapes is, widths in multiples of 8")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every latency measurement (default 1: with as many threads as "
                             "cores, any other busy process stalls every parallel op)")
    parser.add_argument("--latency-runtime", choices=("torch", "onnxruntime"), default=None,
                        help="runtime the latency table is measured on (default: --runtime where the command "
                             "has one, else torch)")


def check_pruning_flags(args: argparse.Namespace) -> None:
    """Refuse, before any model is loaded, a data-driven criterion without what it needs."""
    from torchslim.criteria import make_importance

    criterion = args.criterion
    if args.recipe:
        from torchslim.pruning.recipe import load_recipe

        try:
            criterion = load_recipe(args.recipe).get("criterion", criterion)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "expert_ratio", None) is not None:
        if args.loss or criterion != "l1":
            raise CliError("--expert-ratio ranks experts by their routing on --data (--expert-importance); --criterion "
                           "and --loss apply to channels")
        return
    try:
        needs_data = hasattr(make_importance(criterion), "prepare")
    except ValueError as exc:
        raise CliError(f"recipe {args.recipe}: {exc}" if args.recipe else str(exc)) from None
    if needs_data and not args.data:
        raise CliError(f"criterion '{criterion}' measures the model on data: give --data FILE.py:NAME (an iterable "
                       "of batches, or a function returning one)")
    if criterion == "taylor" and not args.loss:
        raise CliError("criterion 'taylor' sums signed gradients over batches and needs a real loss: give --loss "
                       "FILE.py:NAME ((output, batch) -> loss); without labels use --criterion fisher, whose "
                       "default loss needs none")
    if not needs_data and ((args.data and not getattr(args, "drop_blocks", 0)) or args.loss):
        raise CliError(f"criterion '{criterion}' uses the weights only: --data and --loss apply to "
                       "taylor, fisher, apoz and mean_activation (and --data to --drop-blocks)")
    if args.loss and criterion not in LOSS_CRITERIA:
        raise CliError(f"criterion '{criterion}' takes no loss: --loss applies to {' and '.join(LOSS_CRITERIA)}")


def pruning_data(args: argparse.Namespace, model, config) -> dict:
    """``data=`` and ``loss_fn=`` for ``prune_`` from --data/--loss ({} for weight-only criteria).

    The first batch is run through the model now, so that a batch the model rejects is a
    one-line error naming --data rather than a failure inside the criterion."""
    if not args.data:
        return {}
    from torchslim.cli._model_spec import import_attribute
    from torchslim.criteria import random_projection_loss

    data = data_batches(args, model)
    loss_fn = None
    if args.loss:
        _, _, loss_fn = import_attribute(args.loss, "--loss file")
        if not callable(loss_fn):
            raise CliError(f"--loss {args.loss} is a {type(loss_fn).__name__}, not a function (output, batch) -> loss")
    elif config.criterion == "fisher":
        loss_fn = random_projection_loss()
        print_note("fisher without --loss: using torchslim.criteria.random_projection_loss() (no labels needed: "
                   "it measures how much the output depends on each channel)")
    return {"data": data, "loss_fn": loss_fn}


def data_batches(args: argparse.Namespace, model):
    """The batches of --data, the first one already run through the model (a batch the model
    rejects is a one-line error naming --data)."""
    import itertools

    import torch

    from torchslim._inputs import call_model
    from torchslim.cli._model_spec import import_attribute
    from torchslim.criteria.taylor import batch_inputs

    _, _, source = import_attribute(args.data, "--data file")
    data = source() if callable(source) else source
    try:
        batches = iter(data)
    except TypeError:
        raise CliError(f"--data {args.data} is a {type(data).__name__}, not an iterable of batches") from None
    first = next(batches, None)
    if first is None:
        raise CliError(f"--data {args.data} gave no batches")
    try:
        with torch.no_grad():
            call_model(model, batch_inputs(first))
    except Exception as exc:  # noqa: BLE001 - the user's model said no to the user's batch: show its words
        raise CliError(f"the model rejected the first batch of --data {args.data}: {type(exc).__name__}: "
                       f"{one_line(str(exc)) or type(exc).__name__}") from None
    return itertools.chain([first], batches)


def config_from_args(args: argparse.Namespace, model):
    """The PruneConfig the flags describe; a bad value is a one-line CliError naming the field.

    With a MACs or params target the per-layer latency table is used by default
    (``latency_aware=True``, ``round_to="latency"``) unless --no-latency-table; an explicit
    --round-to, or a recipe's own ``latency_aware`` / ``round_to``, wins."""
    import torchslim
    from torchslim.pruning import config_from_recipe
    from torchslim.pruning.recipe import load_recipe

    fields = dict(criterion=args.criterion, exclude=tuple(args.exclude), exact_only=args.exact_only or None,
                  latency_aware=args.latency_aware or None, latency_threads=args.threads,
                  latency_runtime=args.latency_runtime or getattr(args, "runtime", None) or "torch")
    if args.round_to is not None:
        fields["round_to"] = args.round_to if args.round_to == "latency" else _int(args.round_to, "--round-to")
    try:
        if args.recipe:
            recipe = load_recipe(args.recipe)
            table = _uses_latency_table(args, recipe.get("target_macs"), recipe.get("target_params"))
            return config_from_recipe(model, args.recipe,
                                      defaults={"latency_aware": True, "round_to": "latency"} if table else {})
        if _uses_latency_table(args, args.target_macs, None):
            fields["latency_aware"] = True
            fields.setdefault("round_to", "latency")
        return torchslim.PruneConfig(ratio=args.ratio or 0.5, target_macs=args.target_macs,
                                     target_latency=getattr(args, "target_latency", None), **fields)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _uses_latency_table(args: argparse.Namespace, target_macs, target_params) -> bool:
    return (target_macs is not None or target_params is not None) and not args.no_latency_table


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CliError(f"{flag} takes an integer or 'latency', got '{text}'") from None
