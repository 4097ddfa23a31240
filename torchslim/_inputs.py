"""Example inputs and model outputs in every shape users pass them.

`example_inputs` may be a tensor, a tuple/list of positional inputs, or an
``(args, kwargs)`` pair whose second item is a dict (e.g. ``model(img, inference=True)``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import torch

ExampleInputs = Any


def normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    """Return ``(args, kwargs)`` for any accepted form of example inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[1], dict) and isinstance(
            example_inputs[0], (tuple, list)
        ):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of inputs or (args, kwargs); got {type(example_inputs).__name__}"
    )


def call_model(model: torch.nn.Module, example_inputs: ExampleInputs) -> Any:
    """Run ``model`` on example inputs in any accepted form."""
    args, kwargs = normalize_inputs(example_inputs)
    return model(*args, **kwargs)


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield every tensor inside nested tuples, lists, dicts, dataclasses and HF ModelOutputs."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):  # includes transformers' ModelOutput (an OrderedDict)
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from iter_tensors(value)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, field.name))


def input_tensors(example_inputs: ExampleInputs) -> list[torch.Tensor]:
    """Every tensor among the example inputs, positional and keyword."""
    args, kwargs = normalize_inputs(example_inputs)
    return list(iter_tensors((args, kwargs)))
