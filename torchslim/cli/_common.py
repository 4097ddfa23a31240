"""Arguments shared by commands that take a MODEL and its inputs."""
from __future__ import annotations

import argparse

from torchslim.cli._model_spec import check_runs, load_model, make_inputs, parse_json, parse_shape


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="torchvision:NAME | timm:NAME | hf:TYPE | torchslim:NAME | file.py:Class | HF dir | torch.save file")
    parser.add_argument("--input", action="append", required=True, help="input shape, e.g. 1,3,224,224 (repeat for several inputs)")
    parser.add_argument("--kwargs", help="JSON keyword inputs for forward, e.g. '{\"inference\": true}'")
    parser.add_argument("--model-kwargs", help="JSON keyword arguments for the model's constructor")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def model_and_inputs(args: argparse.Namespace):
    shapes = [parse_shape(s) for s in args.input]
    kwargs = parse_json(args.kwargs, "--kwargs")
    model = load_model(args.model, parse_json(args.model_kwargs, "--model-kwargs"))
    inputs = make_inputs(model, shapes, kwargs)
    check_runs(model, inputs, shapes)
    return model, inputs
