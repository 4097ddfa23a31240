"""Slimmable checkpoints without pickle: the model at full width (its channels sorted) as an
ordinary torchslim checkpoint, plus ``slimmable.json`` (the configuration and which groups
narrow) and, with switchable BatchNorm, ``switchable.safetensors`` (each width's private
BatchNorm). Loading rebuilds the slimmable model on a freshly built original."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.io import CheckpointError, load, save
from torchslim.slimmable.config import SlimmableConfig
from torchslim.slimmable.slimmable import Slimmable, build_slimmable

SLIMMABLE_FILE = "slimmable.json"
SWITCHABLE_FILE = "switchable.safetensors"
FORMAT = "torchslim.slimmable/1"


def save_slimmable(slim: Slimmable, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``slim`` to the directory ``path`` (loadable with :func:`load_slimmable`; the
    directory is also an ordinary checkpoint of the full-width model)."""
    config = slim.config
    if not isinstance(config.criterion, str) or config.filter_fn is not None:
        described = {"criterion": config.criterion if isinstance(config.criterion, str) else repr(config.criterion),
                     "filter_fn": None if config.filter_fn is None else repr(config.filter_fn)}
    else:
        described = {"criterion": config.criterion, "filter_fn": None}
    directory = save(slim.model, path, metadata=metadata)
    info = {"format": FORMAT, "widths": list(config.widths), "width_range": config.width_range,
            "exclude": list(config.exclude), "round_to": config.round_to, "switchable_bn": config.switchable_bn,
            "groups": [g.index for g in slim.groups], "left_out": {str(k): v for k, v in slim.left_out.items()},
            **described}
    (directory / SLIMMABLE_FILE).write_text(json.dumps(info, indent=1))
    if config.switchable_bn:
        save_file({f"{key}.{name}": t.detach().contiguous() for key, per_width in slim.switchable.items()
                   for name, t in per_width.state_dict().items()}, str(directory / SWITCHABLE_FILE))
    return directory


def load_slimmable(path: str | os.PathLike, model: nn.Module, example_inputs: ExampleInputs, *,
                   weights_loaded: bool = False) -> Slimmable:
    """Load a :func:`save_slimmable` directory into ``model`` (freshly built, as originally
    constructed) and make it slimmable again without re-sorting; a file from another model or
    a damaged one raises ``CheckpointError`` before ``model`` is touched. ``weights_loaded``:
    ``model`` already holds the checkpoint (``torchslim.load``, or the CLI's MODEL)."""
    directory = Path(path)
    info = _read_info(directory)
    config = SlimmableConfig(widths=tuple(info["widths"]),
                             width_range=tuple(info["width_range"]) if info["width_range"] is not None else None,
                             criterion=info["criterion"], exclude=tuple(info["exclude"]), round_to=info["round_to"],
                             switchable_bn=info["switchable_bn"])
    switchable = load_file(str(directory / SWITCHABLE_FILE)) if config.switchable_bn else {}
    if not weights_loaded:
        load(directory, model)
    slim = build_slimmable(model, example_inputs, config, groups=info["groups"])
    if config.switchable_bn:
        expected = {f"{key}.{name}" for key, per_width in slim.switchable.items() for name in per_width.state_dict()}
        if set(switchable) != expected:
            raise CheckpointError(f"{directory / SWITCHABLE_FILE} holds {len(switchable)} tensors, the model's "
                                  f"switchable BatchNorms {len(expected)}: is this the checkpoint of this model?")
        for key, per_width in slim.switchable.items():
            per_width.load_state_dict({name[len(key) + 1:]: t for name, t in switchable.items()
                                       if name.startswith(key + ".")})
    return slim


def _read_info(directory: Path) -> dict[str, Any]:
    file = directory / SLIMMABLE_FILE
    try:
        info = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {SLIMMABLE_FILE}: not a slimmable checkpoint "
                              "(load it with torchslim.load)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{file}: 'format' must be {FORMAT!r}")
    missing = sorted({"widths", "width_range", "exclude", "round_to", "switchable_bn", "groups", "criterion"} - set(info))
    if missing:
        raise CheckpointError(f"{file}: missing key(s) {missing}")
    if info["switchable_bn"] and not (directory / SWITCHABLE_FILE).is_file():
        raise CheckpointError(f"{directory} has no {SWITCHABLE_FILE}, which a switchable-BatchNorm model needs")
    return info
