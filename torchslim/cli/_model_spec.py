"""Resolve MODEL specs and build example inputs; shared by every CLI command.

MODEL specs (:func:`load_model`):

* ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME, weights=None)`` (and
  ``weights_backbone=None`` where the builder has it): random init, nothing downloaded.
* ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False)``.
* ``hf:MODEL_TYPE`` -- ``transformers.AutoModel.from_config(AutoConfig.for_model(MODEL_TYPE))``:
  the default configuration of that model type, random init; ``--model-kwargs`` override
  config fields (e.g. ``{"num_hidden_layers": 2}``).
* a local Hugging Face directory (has ``config.json``) -- ``AutoModel.from_pretrained(DIR,
  local_files_only=True)``.
* ``torchslim:NAME`` -- a bundled model (``torchslim.models``: ``modnet``, ``digits_cnn``).
* ``path/to/file.py:ClassOrFactory`` -- imports the file and calls the attribute with
  ``--model-kwargs`` (none by default); a module-level ``nn.Module`` instance is used as is.
* a torchslim checkpoint directory (``meta.json`` + ``plan.json`` + ``model.safetensors``,
  written by ``torchslim prune --out``) -- the original is rebuilt from the spec recorded at
  save time and the checkpoint is loaded into it with :func:`torchslim.load` (no unpickling).
* ``path/to/model.pt`` -- a whole module saved with ``torch.save(model, path)``, loaded with
  ``torch.load(weights_only=False)``. **This unpickles the file, which can run arbitrary
  code: only load files you trust.**

Example inputs (:func:`make_inputs`): one tensor per ``--input`` shape, passed positionally.
Floats from ``randn`` in ``dtype``, except for token models: a Hugging Face model whose main
input is ``input_ids`` gets random token ids of the first shape as ``input_ids=`` (plus
``decoder_input_ids`` of the same shape for encoder-decoder models), and a model whose
first layer is an ``nn.Embedding`` gets token ids in ``[0, num_embeddings)``. Other Hugging
Face models get their main input (``pixel_values``, ...) as a keyword. ``--kwargs`` JSON is
passed to ``forward`` as keyword arguments. Inputs are seeded (0), so runs repeat.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.cli._errors import CliError, one_line

ZOOS = ("torchvision", "timm", "hf", "torchslim")
SPEC_HELP = ("torchvision:NAME | timm:NAME | hf:MODEL_TYPE | torchslim:NAME | path/file.py:ClassOrFactory | "
             "local Hugging Face directory | torchslim checkpoint directory | "
             "torch.save'd module file (unpickled: only files you trust)")
DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64}


# ----------------------------------------------------------------------------- parsing


def parse_json(text: str | None, flag: str) -> dict:
    """A JSON object from a command-line flag (``None`` or empty: ``{}``)."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{flag} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): {text}") from None
    if not isinstance(value, dict):
        raise CliError(f"{flag} must be a JSON object like '{{\"key\": 1}}', got a {type(value).__name__}: {text}")
    return value


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise CliError(f"--input must be comma-separated integers like 1,3,224,224, got '{text}'") from None
    if any(s <= 0 for s in shape):
        raise CliError(f"--input sizes must be positive integers, got '{text}'")
    return shape


def parse_dtype(text: str | None) -> torch.dtype:
    if text is None:
        return torch.float32
    if text not in DTYPES:
        raise CliError(f"unknown --dtype '{text}'; choose from {', '.join(DTYPES)}")
    return DTYPES[text]


# ----------------------------------------------------------------------------- models


def load_model(spec: str, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the model named by ``spec`` (see the module docstring), in eval mode, on the CPU."""
    kwargs = dict(model_kwargs or {})
    zoo, sep, name = spec.partition(":")
    path = Path(spec)
    _refuse_link_loop(path)
    if sep and zoo in ZOOS and not path.exists():
        if not name:
            raise CliError(f"model spec '{spec}' names no model: use {zoo}:NAME")
        model = {"torchvision": _torchvision, "timm": _timm, "hf": _hf, "torchslim": _bundled}[zoo](name, kwargs)
    elif is_checkpoint_dir(path):
        model = _torchslim_checkpoint(path, kwargs)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{spec} is a directory without config.json or meta.json: neither a Hugging Face "
                           "model directory nor a torchslim checkpoint")
        model = _hf_directory(path, kwargs)
    elif sep and (name and not path.exists() and spec.rpartition(":")[0].endswith(".py")):
        model = _from_python_file(spec, kwargs)
    elif path.is_file():
        model = _torch_load(path, kwargs)
    elif sep and spec.rpartition(":")[0].endswith(".py"):
        raise CliError(f"model spec '{spec}' names no attribute: use file.py:ClassOrFactory")
    elif spec.endswith(".py"):
        raise CliError(f"model spec '{spec}' names no class: use {spec}:ClassOrFactory")
    elif sep:
        raise CliError(f"unknown model spec '{spec}': '{zoo}:' is not a zoo; use {SPEC_HELP}")
    else:
        raise CliError(f"model file not found and not a model spec: '{spec}' (use {SPEC_HELP})")
    if not isinstance(model, nn.Module):
        raise CliError(f"'{spec}' gave a {type(model).__name__}, not an nn.Module")
    return model.eval()


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _import_zoo(module: str, package: str, spec: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CliError(f"'{spec}' needs {package}: pip install 'torchslim[zoo]'") from None


def _construct(what: str, factory, kwargs: dict) -> nn.Module:
    try:
        return factory(**kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise CliError(f"building {what} with --model-kwargs {json.dumps(kwargs)} failed: "
                       f"{type(exc).__name__}: {one_line(str(exc))}") from None


def _torchvision(name: str, kwargs: dict) -> nn.Module:
    models = _import_zoo("torchvision.models", "torchvision", f"torchvision:{name}")
    names = models.list_models()
    if name not in names:
        raise CliError(f"unknown torchvision model '{name}'{_suggest(name, names)}")
    builder = models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    kwargs.setdefault("weights", None)
    if "weights_backbone" in params:  # detection / segmentation: no backbone download either
        kwargs.setdefault("weights_backbone", None)
    return _construct(f"torchvision:{name}", builder, kwargs)


def _timm(name: str, kwargs: dict) -> nn.Module:
    timm = _import_zoo("timm", "timm", f"timm:{name}")
    if not timm.is_model(name):
        raise CliError(f"unknown timm model '{name}'{_suggest(name, timm.list_models())}")
    kwargs.setdefault("pretrained", False)
    return _construct(f"timm:{name}", lambda **kw: timm.create_model(name, **kw), kwargs)


def _hf(model_type: str, kwargs: dict) -> nn.Module:
    transformers = _import_zoo("transformers", "transformers", f"hf:{model_type}")
    try:
        config = transformers.AutoConfig.for_model(model_type, **kwargs)
    except ValueError as exc:
        known: list[str] = list(getattr(getattr(transformers, "CONFIG_MAPPING", None), "keys", lambda: [])())
        raise CliError(f"unknown Hugging Face model type '{model_type}'{_suggest(model_type, known)}"
                       if model_type not in known else f"hf:{model_type}: {one_line(str(exc))}") from None
    try:
        return transformers.AutoModel.from_config(config)
    except (ValueError, KeyError, ImportError) as exc:
        raise CliError(f"hf:{model_type} has no AutoModel class: {one_line(str(exc))}") from None


def _hf_directory(path: Path, kwargs: dict) -> nn.Module:
    transformers = _import_zoo("transformers", "transformers", str(path))
    try:
        return transformers.AutoModel.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"cannot load the Hugging Face model in {path}: {one_line(str(exc))}") from None


def _bundled(name: str, kwargs: dict) -> nn.Module:
    from torchslim.models import create_model, list_models

    if name not in list_models():
        raise CliError(f"unknown torchslim model '{name}'; bundled: {', '.join(list_models())}")
    return _construct(f"torchslim:{name}", lambda **kw: create_model(name, **kw), kwargs)


def _from_python_file(spec: str, kwargs: dict) -> nn.Module:
    path, attr, target = import_attribute(spec, "model file", _is_model_like)
    if isinstance(target, nn.Module):
        if kwargs:
            raise CliError(f"{path}:{attr} is a module instance; --model-kwargs cannot apply to it")
        return target
    if not callable(target):
        raise CliError(f"{path}:{attr} is a {type(target).__name__}, not a class or factory")
    return _construct(f"{path}:{attr}", target, kwargs)


def _is_model_like(value: Any) -> bool:
    return isinstance(value, nn.Module) or (inspect.isclass(value) and issubclass(value, nn.Module)) or \
        inspect.isfunction(value)


def import_attribute(spec: str, what: str = "file", suggestable=callable) -> tuple[Path, str, Any]:
    """Import ``path/file.py`` of a ``path/file.py:ATTR`` spec and return ``(path, ATTR, value)``;
    a missing file, a failing import or a missing attribute is a one-line CliError (an unknown
    attribute suggests the closest public names for which ``suggestable`` holds)."""
    path_text, sep, attr = spec.rpartition(":")
    if not sep or not attr or not path_text.endswith(".py"):
        raise CliError(f"'{spec}' is not a path/file.py:NAME spec")
    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"{what} not found: {path}")
    module_name = f"torchslim_user_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise CliError(f"{what} {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # sibling imports
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file failed to import: say how
        sys.modules.pop(module_name, None)
        raise CliError(f"importing {path} failed: {type(exc).__name__}: {one_line(str(exc))}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    if not hasattr(module, attr):
        candidates = [n for n, v in vars(module).items() if not n.startswith("_") and suggestable(v)]
        raise CliError(f"{path} has no attribute '{attr}'{_suggest(attr, candidates)}")
    return path, attr, getattr(module, attr)


def source_metadata(spec: str, model_kwargs: dict[str, Any], inputs: list[str], kwargs: dict[str, Any],
                    dtype: str | None = None) -> dict[str, Any]:
    """What a checkpoint records so that the CLI can rebuild its original and run it: the spec
    (a Python file's path made absolute), the constructor's keyword arguments, the ``--input``
    shapes, ``forward``'s keyword arguments and the dtype. :func:`recorded_source` reads it."""
    path_text, sep, attr = spec.rpartition(":")
    if sep and path_text.endswith(".py") and Path(path_text).is_file():
        spec = f"{Path(path_text).resolve()}:{attr}"
    elif Path(spec).exists():
        spec = str(Path(spec).resolve())
    return {"model": spec, "model_kwargs": dict(model_kwargs), "inputs": list(inputs), "kwargs": dict(kwargs),
            "dtype": dtype}


def is_checkpoint_dir(path: Path) -> bool:
    """A directory holding any file of a torchslim checkpoint (even a broken one, so that its
    problem is reported as such) and no Hugging Face ``config.json``."""
    import os

    from torchslim.io.serialization import META_FILE, PLAN_FILE, WEIGHTS_FILE

    return path.is_dir() and not (path / "config.json").is_file() and any(
        os.path.lexists(path / name) for name in (META_FILE, PLAN_FILE, WEIGHTS_FILE))


def _refuse_link_loop(path: Path) -> None:
    import errno
    import os

    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CliError(f"{path} is a symbolic link loop") from None


def recorded_source(spec: str) -> dict[str, Any]:
    """What a torchslim checkpoint directory records about how it was made ({} for other
    specs); a checkpoint whose meta.json is missing or unreadable is a CliError saying so."""
    path = Path(spec)
    _refuse_link_loop(path)
    if not is_checkpoint_dir(path):
        return {}
    from torchslim.io import CheckpointError, read_metadata

    try:
        source = read_metadata(path).get("source")
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    return source if isinstance(source, dict) else {}


def _torchslim_checkpoint(path: Path, kwargs: dict) -> nn.Module:
    from torchslim.io import CheckpointError, load

    if kwargs:
        raise CliError(f"{path} is a torchslim checkpoint; --model-kwargs cannot apply to it (they were recorded "
                       "when it was saved)")
    source = recorded_source(str(path))
    if not isinstance(source.get("model"), str):
        raise CliError(f"{path}: the checkpoint does not record which model it was pruned from; load it in "
                       "Python with torchslim.load(path, freshly_built_original)")
    if Path(source["model"]).resolve() == path.resolve():
        raise CliError(f"{path}: the checkpoint names itself as its original")
    original = load_model(source["model"], source.get("model_kwargs") or {})
    try:
        return load(path, original)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None


def _torch_load(path: Path, kwargs: dict) -> nn.Module:
    if kwargs:
        raise CliError(f"{path} is a saved module; --model-kwargs cannot apply to it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - not a torch file, a missing class, a truncated file ...
        raise CliError(f"cannot load {path} with torch.load: {type(exc).__name__}: {one_line(str(exc))}") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CliError(f"{path} holds a state_dict, not a module: build the model with file.py:Class and "
                       "load the weights yourself, or save the whole module with torch.save(model, path)")
    if not isinstance(obj, nn.Module):
        raise CliError(f"{path} holds a {type(obj).__name__}, not a saved nn.Module")
    return obj


# ----------------------------------------------------------------------------- inputs


def _hf_main_input(model: nn.Module) -> str | None:
    if hasattr(model, "main_input_name") and hasattr(model, "config") and hasattr(model.config, "model_type"):
        return str(model.main_input_name)
    return None


def _token_bound(model: nn.Module) -> int | None:
    """Token-id range for models that start with an embedding, else None."""
    first = next((m for m in model.modules() if next(iter(m.children()), None) is None), None)
    return first.num_embeddings if isinstance(first, nn.Embedding) else None


def make_inputs(model: nn.Module, shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32,
                kwargs: dict[str, Any] | None = None, *, seed: int = 0):
    """Example inputs ``(args, kwargs)`` for ``model`` from ``--input`` shapes (see the module docstring)."""
    if not shapes:
        raise CliError("give at least one --input shape, e.g. --input 1,3,224,224")
    kwargs = dict(kwargs or {})
    gen = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    floats = lambda shape: torch.randn(shape, generator=gen, dtype=dtype).to(device)  # noqa: E731
    main = _hf_main_input(model)
    if main is not None:
        if len(shapes) > 1:
            raise CliError(f"Hugging Face models take one --input (the shape of {main}); got {len(shapes)}")
        if main == "input_ids":
            vocab = int(getattr(model.config, "vocab_size", None) or _token_bound(model) or 100)
            ids = lambda: torch.randint(0, vocab, shapes[0], generator=gen).to(device)  # noqa: E731
            kwargs.setdefault("input_ids", ids())
            if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in inspect.signature(
                    model.forward).parameters:
                kwargs.setdefault("decoder_input_ids", ids())
        else:
            kwargs.setdefault(main, floats(shapes[0]))
        return (), kwargs
    bound = _token_bound(model)
    if bound is not None:
        tensors = [torch.randint(0, bound, shape, generator=gen).to(device) for shape in shapes]
    else:
        tensors = [floats(shape) for shape in shapes]
    return tuple(tensors), kwargs


def describe_inputs(inputs) -> str:
    """``1x3x8x8, inference=False``: the shapes and keyword values tried, for error messages."""
    args, kwargs = inputs
    parts = ["x".join(map(str, t.shape)) for t in args]
    for key, value in kwargs.items():
        parts.append(f"{key}={'x'.join(map(str, value.shape)) if isinstance(value, torch.Tensor) else repr(value)}")
    return ", ".join(parts)


def check_runs(model: nn.Module, inputs, shapes=None) -> None:
    """Run the model once (eval, no_grad) so that a rejected input gets the model's own message."""
    from torchslim._inputs import call_model

    try:
        with torch.no_grad():
            call_model(model, inputs)
    except Exception as exc:  # noqa: BLE001 - the user's model said no: show its words
        message = one_line(str(exc)) or type(exc).__name__
        raise CliError(f"the model rejected input shape(s) {describe_inputs(inputs)}: {type(exc).__name__}: {message}") from None
