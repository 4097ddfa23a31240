"""Resolve MODEL specs and build example inputs, shared by every CLI command.

Specs: ``torchvision:NAME`` (weights=None), ``timm:NAME`` (pretrained=False),
``hf:MODEL_TYPE`` (random init from the default config), a local HF directory,
``path/to/file.py:ClassOrFactory`` (called with --model-kwargs), ``torchslim:NAME``
(bundled models), or a ``torch.save``-d module (this unpickles: only load files you trust).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.cli._errors import CliError


def parse_json(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{flag} is not valid JSON ({exc.msg} at column {exc.colno}): {text}") from None
    if not isinstance(value, dict):
        raise CliError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise CliError(f"--input must be comma-separated integers like 1,3,224,224, got '{text}'") from None
    if not shape or any(s <= 0 for s in shape):
        raise CliError(f"--input sizes must be positive, got '{text}'")
    return shape


def load_model(spec: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the model named by ``spec`` (see module docstring), in eval mode."""
    kwargs = model_kwargs or {}
    zoo, _, name = spec.partition(":")
    if zoo == "torchvision" and name:
        model = _zoo_module("torchvision.models", "torchvision", spec).get_model(name, weights=None, **kwargs) \
            if name in _torchvision_names() else _fail(f"unknown torchvision model '{name}'")
    elif zoo == "timm" and name:
        timm = _zoo_module("timm", "timm", spec)
        if not timm.is_model(name):
            raise CliError(f"unknown timm model '{name}'")
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif zoo == "hf" and name:
        transformers = _zoo_module("transformers", "transformers", spec)
        try:
            config = transformers.AutoConfig.for_model(name, **kwargs)
        except ValueError as exc:
            raise CliError(f"unknown Hugging Face model type '{name}': {str(exc).splitlines()[0]}") from None
        model = transformers.AutoModel.from_config(config)
    elif zoo == "torchslim" and name:
        from torchslim.models import create_model

        try:
            model = create_model(name, **kwargs)
        except KeyError as exc:
            raise CliError(str(exc.args[0])) from None
    elif Path(spec).is_dir() and (Path(spec) / "config.json").exists():
        transformers = _zoo_module("transformers", "transformers", spec)
        model = transformers.AutoModel.from_pretrained(spec, local_files_only=True)
    elif ".py:" in spec:
        model = _from_python_file(spec, kwargs)
    elif Path(spec).is_file():
        model = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise CliError(f"{spec} holds a {type(model).__name__}, not a saved nn.Module (save the whole model)")
    else:
        raise CliError(f"cannot resolve model '{spec}': use torchvision:NAME, timm:NAME, hf:TYPE, "
                       "torchslim:NAME, file.py:Class, a HF directory or a torch.save file")
    return model.eval()


def _fail(message: str):
    raise CliError(message)


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models())


def _zoo_module(module: str, package: str, spec: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CliError(f"'{spec}' needs {package}: pip install 'torchslim[zoo]'") from None


def _from_python_file(spec: str, kwargs: dict) -> nn.Module:
    path_text, _, attr = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, attr):
        raise CliError(f"{path} has no attribute '{attr}'")
    try:
        model = getattr(module, attr)(**kwargs)
    except TypeError as exc:
        raise CliError(f"{path}:{attr}(**{kwargs}) failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise CliError(f"{path}:{attr} returned {type(model).__name__}, not an nn.Module")
    return model


def make_inputs(model: nn.Module, shapes: list[tuple[int, ...]], kwargs: dict[str, Any]):
    """Example inputs: random floats, or token ids for models whose first layer is an embedding."""
    tokens = _wants_token_ids(model)
    tensors = [torch.randint(0, 100, shape) if tokens else torch.randn(shape) for shape in shapes]
    if tokens and not kwargs:
        return ((), {"input_ids": tensors[0]}) if len(tensors) == 1 else (tuple(tensors), {})
    return (tuple(tensors), kwargs)


def _wants_token_ids(model: nn.Module) -> bool:
    first = next((m for m in model.modules() if not list(m.children())), None)
    return isinstance(first, nn.Embedding)


def check_runs(model: nn.Module, inputs, shapes) -> None:
    """Run once so that a rejected input shape gives the model's own message."""
    from torchslim._inputs import call_model

    try:
        with torch.no_grad():
            call_model(model, inputs)
    except Exception as exc:  # noqa: BLE001 - the user's model said no: show its words
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"the model rejected input shape(s) {', '.join('x'.join(map(str, s)) for s in shapes)}: {first}") from None
