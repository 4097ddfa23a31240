"""Arguments shared by commands that take a MODEL and its example inputs."""
from __future__ import annotations

import argparse

from torchslim.cli._model_spec import (SPEC_HELP, DTYPES, check_runs, load_model, make_inputs, parse_dtype,
                                       parse_json, parse_shape)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --input (repeatable), --dtype, --kwargs, --model-kwargs, --debug."""
    parser.add_argument("model", metavar="MODEL", help=SPEC_HELP)
    parser.add_argument("--input", action="append", required=True, metavar="SHAPE",
                        help="input shape, e.g. 1,3,224,224; repeat for several positional inputs. Hugging Face "
                             "token models: the shape of input_ids, e.g. 1,16")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the model and its float inputs (default float32)")
    parser.add_argument("--kwargs", metavar="JSON", help="keyword arguments for forward, e.g. '{\"inference\": false}'")
    parser.add_argument("--model-kwargs", metavar="JSON",
                        help="keyword arguments for the model's constructor (the config for hf:TYPE)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def model_and_inputs(args: argparse.Namespace):
    """Parse the shared flags, build the model and its inputs, and check the model accepts them."""
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
