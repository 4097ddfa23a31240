"""Pruned checkpoints: ``save`` a pruned model with its plan, ``load`` it into a freshly built original.

A checkpoint is a directory of three files, none of them pickled::

    model.safetensors   the pruned state_dict (tied/shared tensors stored once)
    plan.json           PruningPlan.to_dict(): what was removed, step by step, the
                        module attributes each step changed (in_channels, num_heads...)
                        and the modules it replaced (an allow-listed type name and
                        JSON-plain constructor kwargs; see torchslim.pruning.replace_module_)
                        or the entries of an nn.ModuleList / nn.Sequential it dropped
                        (whole blocks or experts; see torchslim.pruning.prune_depth_
                        and prune_experts_)
    meta.json           format, versions, model class, parameter count, sha256 of the
                        two other files, aliases of tied tensors, user metadata

``load`` validates everything against the model *before* touching it (files, hashes,
every plan name and shape, every weight key and shape, every attribute), then replays
the plan and sets the weights inside a :class:`~torchslim.pruning._surgery.Transaction`,
so a failure at any point leaves the model exactly as it was.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.pruning import (Transaction, build_replacement, get_attribute, has_attribute, named_tensors,
                               remember_former_shapes, sync_hf_config)
from torchslim.pruning.apply import RemovalPlan, apply_plan, renumbered_index
from torchslim.pruning.depth import apply_drops
from torchslim.sparsity import parametrization_problem
from torchslim.pruning.plan import (PLAN_FORMATS, PlanStep, PruningPlan, history_mismatch, name_after_drops,
                                    record_history, recorded_history, under)

FORMAT = "torchslim.checkpoint/1"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
META_FILE = "meta.json"

# attribute values a plan may set, and the current values it may replace: plain data only,
# so a tampered plan.json can never swap a method, a module or a tensor
_PLAIN = (type(None), bool, int, float, str, tuple, list, torch.Size)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------
def save(model: nn.Module, path: str | os.PathLike, plan: Any = None, *,
         metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (pruned) and its pruning plan to the directory ``path``; returns the directory.

    Without ``plan`` the model's own history is written (``torchslim.pruning_history``: the
    checkpoint's plan if it was loaded, then every ``prune_`` since), after checking that the
    model's shapes are still the ones that history left them at (not changed by hand since);
    a model never pruned gets an empty plan. An explicit ``plan`` (a ``PruningPlan``,
    ``PruneResult`` or ``IterativeResult``) is written as given: ``load`` then expects the
    model that plan started from (the CLI records it). ``metadata`` is any JSON-serialisable
    dict, stored in ``meta.json``. Files are written atomically (temporary file, then rename).
    """
    _refuse_parametrized(model, "torchslim.save")
    plan = _plan_to_save(model, plan)
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory (a checkpoint is a directory)")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    _check_plan_matches_model(plan, model)
    plan_text = _dumps(plan.to_dict(), PLAN_FILE)
    meta_user = json.loads(_dumps(metadata or {}, "metadata"))  # fail early on non-JSON metadata
    tensors, aliases = _dedupe_state_dict(model.state_dict())

    directory.mkdir(parents=True, exist_ok=True)
    weights_tmp = _tmp_path(directory, WEIGHTS_FILE)
    try:
        weights_sha = write_safetensors(tensors, weights_tmp, {"format": "pt", "torchslim": FORMAT})
        meta = {
            "format": FORMAT,
            "torchslim_version": _torchslim_version(),
            "torch_version": torch.__version__,
            "model_class": _qualname(model),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "plan_steps": len(plan.steps),
            "num_removed": plan.num_removed,
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": weights_sha,
            "plan_sha256": hashlib.sha256(plan_text.encode()).hexdigest(),
            "aliases": aliases,
            "metadata": meta_user,
        }
        os.replace(weights_tmp, directory / WEIGHTS_FILE)
    finally:
        if weights_tmp.exists():
            weights_tmp.unlink()
    _write_text(directory / PLAN_FILE, plan_text)
    _write_text(directory / META_FILE, _dumps(meta, META_FILE))  # last: a complete meta means a complete save
    return directory


# safetensors' dtype names (https://github.com/huggingface/safetensors: the format's header)
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_WRITE_CHUNK = 64 << 20  # bytes handed to write() and the hash at a time


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> str:
    """Write ``tensors`` (CPU, contiguous, none sharing memory) to ``path`` in the safetensors
    format and return the file's sha256, hashed as it is written.

    The tensors' own memory is written, one after the other: nothing is copied (older
    safetensors releases turn every tensor into a bytes object first, a second copy of the
    model in memory) and the file is not read back to hash it. Little-endian machines; elsewhere, or
    for a dtype not listed here, ``safetensors.torch.save_file`` writes it."""
    if sys.byteorder != "little" or any(t.dtype not in _SAFETENSORS_DTYPES or t.device.type != "cpu"
                                        or not t.is_contiguous() for t in tensors.values()):
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
        return _sha256_file(Path(path))
    # widest dtypes first, as safetensors orders them: every tensor then starts aligned to its element size
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for prefix in (len(text).to_bytes(8, "little"), text):
            handle.write(prefix)
            digest.update(prefix)
        for name in order:
            tensor = tensors[name].detach()
            if tensor.numel() == 0:
                continue
            data = tensor.reshape(-1).view(torch.uint8).numpy()  # the tensor's memory, not a copy
            for start in range(0, data.size, _WRITE_CHUNK):
                piece = data[start:start + _WRITE_CHUNK]
                handle.write(piece.data)
                digest.update(piece.data)
    return digest.hexdigest()


def _refuse_parametrized(model: nn.Module, action: str) -> None:
    """Masked weights live in ``parametrizations.<name>.original``: no plan or checkpoint describes them."""
    problem = parametrization_problem(model, action)
    if problem is not None:
        raise CheckpointError(problem)


def _plan_to_save(model: nn.Module, plan: Any) -> PruningPlan:
    """The plan given, or else ``model``'s own history after checking that its current shapes
    are still the ones that history left (empty for a model never pruned)."""
    if plan is not None:
        return _as_plan(plan)
    history = recorded_history(model)
    if history is None:
        return PruningPlan()
    mismatch = history_mismatch(model)
    if mismatch is not None:
        raise CheckpointError(f"cannot save {_qualname(model)}: its shapes no longer match its pruning history "
                              f"({mismatch}); was it changed by hand after prune_/load? Pass the plan that "
                              "re-creates it from the original, or prune with torchslim.prune_ only (and swap "
                              "modules with torchslim.replace_module_, which records the swap)")
    return history.plan


def _as_plan(plan: Any) -> PruningPlan:
    if plan is None:
        return PruningPlan()
    if hasattr(plan, "plan") and isinstance(plan.plan, PruningPlan):  # a PruneResult
        return plan.plan
    if isinstance(plan, PruningPlan):
        return plan
    raise TypeError(f"plan must be a PruningPlan or a PruneResult, got {type(plan).__name__}")


def _check_plan_matches_model(plan: PruningPlan, model: nn.Module) -> None:
    """The plan's final shapes must be the model's current shapes (catches passing the wrong plan)."""
    final: dict[str, list[int]] = {}
    for step in plan.steps:
        final = {moved: shape for n, shape in final.items() if (moved := name_after_drops(n, step.dropped)) is not None}
        for path in step.replaced:  # the replaced module's tensors are gone
            final = {n: shape for n, shape in final.items() if not under(n, path)}
        for name, shape in step.shapes.items():
            new = list(shape)
            for dim, gone in step.removed.get(name, {}).items():
                new[dim] -= len(set(gone))
            final[name] = new
    tensors = named_tensors(model)
    for name, shape in final.items():
        if name not in tensors:
            raise CheckpointError(f"the plan names '{name}', which {_qualname(model)} does not have: "
                                  "is this the plan of this model?")
        if list(tensors[name].shape) != shape:
            raise CheckpointError(f"the plan leaves '{name}' with shape {shape} but the model's is "
                                  f"{list(tensors[name].shape)}: pass the plan of every pruning applied "
                                  "(plan1.extend(plan2) for successive prunings)")


def _dedupe_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous tensors with tied entries stored once; returns (tensors, alias -> stored key).

    safetensors refuses tensors sharing memory: exact aliases (tied weights, a module
    registered twice) are stored once and named in ``aliases``; partial overlaps are cloned.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: dict[int, int] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state_dict entry '{key}' is a {type(value).__name__}, not a tensor: "
                                  "extra state cannot be stored in safetensors")
        value = value.detach()
        if value.numel() and value.device.type != "meta":
            ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                     tuple(value.shape), tuple(value.stride()), value.dtype)
            if ident in seen:
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
            ptr = value.untyped_storage().data_ptr()
            storages[ptr] = storages.get(ptr, 0) + 1
        tensors[key] = value
    out = {}
    for key, value in tensors.items():
        shared = value.numel() and value.device.type != "meta" and storages[value.untyped_storage().data_ptr()] > 1
        value = value.cpu().contiguous()
        out[key] = value.clone() if shared else value
    return out, aliases


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------
def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Re-create a saved pruned model from ``model``, a freshly built *unpruned* original.

    The plan is replayed step by step (every parameter and buffer sliced to the kept
    indices, every recorded module attribute set), then the saved weights are set strictly
    (same keys, same shapes). Everything is validated first; on any error a
    :class:`CheckpointError` (a ``ValueError``) names the file or key at fault and the model
    is left untouched. Returns ``model``, modified in place: its parameters stay the same
    objects (an optimizer built before keeps training them, if it has no state yet) and its
    pruning history starts with the checkpoint's plan, so it can be pruned again and saved.
    """
    directory = Path(path)
    if directory.is_file() and directory.name in (META_FILE, PLAN_FILE, WEIGHTS_FILE):
        directory = directory.parent  # a file of the checkpoint names its directory
    _refuse_parametrized(model, "torchslim.load")
    meta, plan, state = _read_checkpoint(directory)
    try:
        tensors_after, built = _validate(directory, meta, plan, state, model)
    except CheckpointError as exc:
        saved_class = meta.get("model_class")
        if saved_class and saved_class != _qualname(model):
            raise CheckpointError(f"{exc} (the checkpoint was saved from {saved_class}, the model is "
                                  f"{_qualname(model)})") from None
        raise
    if meta.get("model_class") != _qualname(model):
        warnings.warn(f"{directory}: checkpoint saved from {meta.get('model_class')}, loading into "
                      f"{_qualname(model)} (every name and shape matches)", stacklevel=2)
    tx = Transaction()
    try:
        _replay_plan(model, plan, tx, built)
        _set_weights(model, state, meta.get("aliases", {}), tx)
        _final_check(model, tensors_after)
    except BaseException:
        tx.rollback()
        raise
    sync_hf_config(model)  # the config follows the replayed widths, as it did after pruning
    remember_former_shapes(model, plan)
    record_history(model, plan, start_over=True)
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The user ``metadata`` stored by :func:`save` (JSON only; weights are not read)."""
    directory = Path(path)
    check_checkpoint_files(directory, (META_FILE,))
    meta = _read_json(directory / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META_FILE}: not a torchslim checkpoint (format is not '{FORMAT}')")
    user = meta.get("metadata", {})
    if not isinstance(user, dict):
        raise CheckpointError(f"{directory / META_FILE}: 'metadata' must be an object")
    return user


def _read_checkpoint(directory: Path) -> tuple[dict, PruningPlan, dict[str, torch.Tensor]]:
    check_checkpoint_files(directory)
    meta = _read_json(directory / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / META_FILE}: not a torchslim checkpoint (format is not '{FORMAT}')")
    _check_meta(meta, directory / META_FILE)

    plan_bytes = (directory / PLAN_FILE).read_bytes()
    if hashlib.sha256(plan_bytes).hexdigest() != meta["plan_sha256"]:
        raise CheckpointError(f"{directory / PLAN_FILE}: sha256 does not match meta.json (file modified or corrupt)")
    plan_data = _parse_json(plan_bytes, directory / PLAN_FILE)
    _check_plan_data(plan_data, directory / PLAN_FILE)
    try:
        plan = PruningPlan.from_dict(plan_data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{directory / PLAN_FILE}: malformed plan ({type(exc).__name__}: {exc})") from None

    weights = directory / WEIGHTS_FILE
    if _sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match meta.json (file truncated, modified or corrupt)")
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{weights}: cannot be read as safetensors ({exc})") from None
    return meta, plan, state


def check_checkpoint_files(directory: Path, names: tuple[str, ...] = (META_FILE, PLAN_FILE, WEIGHTS_FILE)) -> None:
    """Raise a CheckpointError naming the first of ``directory`` and its ``names`` that is not
    a readable file, and why: absent, a symbolic link loop, a dangling link, not a file."""
    problem = _path_problem(directory, want_dir=True)
    if problem:
        raise CheckpointError(f"checkpoint directory {directory} {problem}")
    for name in names:
        problem = _path_problem(directory / name, want_dir=False)
        if problem == "does not exist":
            raise CheckpointError(f"checkpoint {directory} has no {name}")
        if problem:
            raise CheckpointError(f"checkpoint {directory}: {directory / name} {problem}")


def _path_problem(path: Path, want_dir: bool) -> str | None:
    """Why ``path`` is not a usable directory (``want_dir``) or regular file; None when it is."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if exc.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read ({exc.strerror})"
    if want_dir and not stat.S_ISDIR(mode):
        return "is not a directory"
    if not want_dir and not stat.S_ISREG(mode):
        return "is a directory, not a file" if stat.S_ISDIR(mode) else "is not a regular file"
    return None


def _check_meta(meta: dict, path: Path) -> None:
    """meta.json's hashes are 64 hex digits and its aliases map names to names."""
    for key in ("weights_sha256", "plan_sha256"):
        value = meta.get(key)
        if key not in meta:
            raise CheckpointError(f"{path}: missing '{key}'")
        if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise CheckpointError(f"{path}: '{key}' must be a sha256 hex digest (64 hex digits), got {value!r}")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{path}: 'aliases' must be an object mapping state_dict keys to stored keys, "
                              f"got {aliases!r}")


def _check_plan_data(data: Any, path: Path) -> None:
    """plan.json's structure, before anything is read from it: a list of steps, each with
    ``removed`` {tensor: {dim: [index, ...]}}, ``shapes`` {tensor: [size, ...]} and
    ``attributes`` {module: {attr: value}}; dims, indices and sizes are non-negative JSON
    integers (not 1.5, not true, not "3"). Errors name the key path and the value found."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must be a JSON object with 'format' and 'steps', got {type(data).__name__}")
    if data.get("format") not in PLAN_FORMATS:
        raise CheckpointError(f"{path}: 'format' must be '{PLAN_FORMATS[0]}', got {data.get('format')!r} (or "
                              f"'{PLAN_FORMATS[1]}' for a plan that replaces modules or renumbers index buffers, "
                              f"'{PLAN_FORMATS[2]}' for one that drops blocks or experts; written by a newer "
                              "torchslim?)")
    version = PLAN_FORMATS.index(data["format"])
    keys = {"removed", "shapes", "attributes"} | ({"replaced", "renumbered"} if version >= 1 else set()) | (
        {"dropped", "experts"} if version >= 2 else set())
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise CheckpointError(f"{path}: 'steps' must be a list of steps, got {_json_kind(steps)}")
    for i, step in enumerate(steps):
        where = f"{path}: steps[{i}]"
        if not isinstance(step, dict):
            raise CheckpointError(f"{where} must be an object with 'removed' and 'shapes', got {_json_kind(step)}")
        unknown = sorted(set(step) - keys)
        if unknown:
            raise CheckpointError(f"{where} has unknown key(s) {unknown}")
        for key in ("removed", "shapes"):
            if not isinstance(step.get(key), dict):
                raise CheckpointError(f"{where}.{key} must be an object, got {_json_kind(step.get(key))}")
        if not isinstance(step.get("attributes", {}), dict):
            raise CheckpointError(f"{where}.attributes must be an object, got {_json_kind(step.get('attributes'))}")
        _check_replaced_data(step.get("replaced", {}), where)
        _check_dropped_data(step.get("dropped", []), where)
        _check_renumbered_data(step.get("renumbered", []), step["removed"], where)
        _check_index_lists(step.get("experts", {}), f"{where}.experts")
        for name, shape in step["shapes"].items():
            if not isinstance(shape, list):
                raise CheckpointError(f"{where}.shapes['{name}'] must be a list of sizes, got {_json_kind(shape)}")
            for k, size in enumerate(shape):
                _check_json_int(size, f"{where}.shapes['{name}'][{k}]", "sizes")
        for name, dims in step["removed"].items():
            if not isinstance(dims, dict):
                raise CheckpointError(f"{where}.removed['{name}'] must be an object {{dim: [indices]}}, "
                                      f"got {_json_kind(dims)}")
            for dim, indices in dims.items():
                if not (dim.isascii() and dim.isdigit()):
                    raise CheckpointError(f"{where}.removed['{name}'] has dim {dim!r}; dims are non-negative integers")
                if not isinstance(indices, list):
                    raise CheckpointError(f"{where}.removed['{name}']['{dim}'] must be a list of indices, "
                                          f"got {_json_kind(indices)}")
                for k, index in enumerate(indices):
                    _check_json_int(index, f"{where}.removed['{name}']['{dim}'][{k}]", "removed indices")


def _check_index_lists(data: Any, where: str) -> None:
    """``experts``: {module path: [non-negative index, ...]}."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} must be an object {{module path: [indices]}}, got {_json_kind(data)}")
    for path, indices in data.items():
        if not isinstance(indices, list):
            raise CheckpointError(f"{where}['{path}'] must be a list of indices, got {_json_kind(indices)}")
        for k, index in enumerate(indices):
            _check_json_int(index, f"{where}['{path}'][{k}]", "indices")


def _check_renumbered_data(renumbered: Any, removed: dict, where: str) -> None:
    """``renumbered`` lists index buffers the step slices along dim 0 only."""
    if not isinstance(renumbered, list) or not all(isinstance(name, str) for name in renumbered):
        raise CheckpointError(f"{where}.renumbered must be a list of buffer names, got {_json_kind(renumbered)}")
    for name in renumbered:
        if set(removed.get(name, {})) != {"0"}:
            raise CheckpointError(f"{where}.renumbered names '{name}', which the step does not slice along dim 0 "
                                  "(alone); an index buffer loses entries only")


def _check_index_buffer(virtual: "_VirtualModel", name: str, where: str) -> None:
    """A renumbered tensor must be a 1-D integer buffer (a permutation index) of the model."""
    tensor = virtual.named.get(name)
    if tensor is None or isinstance(tensor, nn.Parameter) or tensor.ndim != 1 or tensor.is_floating_point():
        kind = "absent" if tensor is None else f"a {'parameter' if isinstance(tensor, nn.Parameter) else 'buffer'} "
        kind += "" if tensor is None else f"of {tensor.ndim} dims, {tensor.dtype}"
        raise CheckpointError(f"{where}: renumbered names '{name}', which is {kind}; only 1-D integer index "
                              "buffers are renumbered")


def _check_replaced_data(replaced: Any, where: str) -> None:
    """``replaced`` is {module path: {"type": name, "init": {kwarg: plain JSON}}}."""
    if not isinstance(replaced, dict):
        raise CheckpointError(f"{where}.replaced must be an object {{module path: {{type, init}}}}, "
                              f"got {_json_kind(replaced)}")
    for module_path, spec in replaced.items():
        at = f"{where}.replaced['{module_path}']"
        if not module_path:
            raise CheckpointError(f"{at}: the model itself cannot be replaced (empty module path)")
        if not isinstance(spec, dict) or set(spec) != {"type", "init"}:
            raise CheckpointError(f"{at} must be an object with exactly 'type' and 'init', got {_json_kind(spec)}")
        if not isinstance(spec["type"], str):
            raise CheckpointError(f"{at}.type must be a type name (a string), got {_json_kind(spec['type'])}")
        if not isinstance(spec["init"], dict):
            raise CheckpointError(f"{at}.init ({spec['type']}) must be an object of keyword arguments, "
                                  f"got {_json_kind(spec['init'])}")


def _check_dropped_data(dropped: Any, where: str) -> None:
    """``dropped`` lists container entries, ``"<container path>.<index>"``, each once."""
    if not isinstance(dropped, list) or not all(isinstance(path, str) for path in dropped):
        raise CheckpointError(f"{where}.dropped must be a list of module paths, got {_json_kind(dropped)}")
    for path in dropped:
        if not (path.rpartition(".")[2].isascii() and path.rpartition(".")[2].isdigit()):
            raise CheckpointError(f"{where}.dropped names '{path}', which is not an entry of a container "
                                  "('<container>.<index>')")
    if len(set(dropped)) != len(dropped):
        raise CheckpointError(f"{where}.dropped names a block twice")


def _check_json_int(value: Any, where: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where} is {json.dumps(value)}; {what} must be non-negative integers")


def _json_kind(value: Any) -> str:
    """How a JSON value reads in an error: ``an object {}``, ``the number 12345``..."""
    if value is None:
        return "null (or no value)"
    kind = {dict: "an object", list: "a list", str: "the string", bool: "the value", int: "the number",
            float: "the number"}.get(type(value), type(value).__name__)
    text = json.dumps(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def _validate(directory: Path, meta: dict, plan: PruningPlan, state: dict[str, torch.Tensor],
              model: nn.Module) -> tuple[dict[str, list[int]], dict[tuple[int, str], nn.Module]]:
    """Check the plan and weights against ``model`` without touching it; returns expected
    post-load shapes per state_dict key and the replacement modules, built, by (step, path)."""
    plan_file = directory / PLAN_FILE
    weights_file = directory / WEIGHTS_FILE
    virtual = _VirtualModel(model)
    group = {name: id(t) for name, t in virtual.named.items()}  # tied names share a group
    shapes = {id(t): list(t.shape) for t in virtual.named.values()}
    built: dict[tuple[int, str], nn.Module] = {}
    for i, step in enumerate(plan.steps, 1):
        where = f"{plan_file} step {i}"
        if step.dropped:
            virtual.drop(step.dropped, where)
            group = {name: id(tensor) for name, tensor in virtual.named.items()}
        for module_path, spec in step.replaced.items():
            replacement = _build_replacement(virtual, module_path, spec, where)
            built[(i, module_path)] = replacement
            virtual.replace(module_path, replacement)
            group = {name: key for name, key in group.items() if not under(name, module_path)}
            for name, tensor in virtual.named.items():
                if under(name, module_path):
                    group[name] = id(tensor)
                    shapes[id(tensor)] = list(tensor.shape)
        for name in step.removed:
            if name not in step.shapes:
                raise CheckpointError(f"{where}: '{name}' is removed from but has no recorded shape")
        after: dict[int, list[int]] = {}
        for name, planned in step.shapes.items():
            if name not in group:
                raise CheckpointError(f"{where}: the plan names '{name}', which the model ({_qualname(model)}) "
                                      "has no parameter or buffer called")
            current = shapes[group[name]]
            if current != list(planned):
                raise CheckpointError(f"{where}: '{name}' has shape {current} in the model, the plan expects "
                                      f"{list(planned)} (is the model freshly built and unpruned, with the same "
                                      "configuration?)")
            new = list(current)
            for dim, gone in step.removed.get(name, {}).items():
                if not 0 <= dim < len(current):
                    raise CheckpointError(f"{where}: '{name}' has no dim {dim}")
                arr = np.asarray(gone, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= current[dim]):
                    raise CheckpointError(f"{where}: '{name}' dim {dim}: removed index out of range "
                                          f"[0, {current[dim]})")
                if np.unique(arr).size != arr.size:
                    raise CheckpointError(f"{where}: '{name}' dim {dim}: duplicate removed indices")
                new[dim] -= arr.size
            previous = after.setdefault(group[name], new)
            if previous != new:
                raise CheckpointError(f"{where}: '{name}' is tied to another entry of the plan that is "
                                      "sliced differently")
        shapes.update(after)
        for name in step.renumbered:
            _check_index_buffer(virtual, name, where)
        for label, attrs in step.attributes.items():
            if not isinstance(attrs, dict):
                raise CheckpointError(f"{where}: attributes of '{label}' must be an object")
            module = _submodule(virtual, label, where)
            for attr, value in attrs.items():
                _check_attribute(module, label, attr, value, where)

    # weights: strict key and shape match against the post-plan state_dict
    aliases = meta.get("aliases", {})
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{directory / META_FILE}: alias '{alias}' points to '{target}', which "
                                  f"{weights_file} does not hold")
    state_vars = virtual.state
    by_id = {id(t): t for t in virtual.named.values()}
    expected: dict[str, list[int]] = {}
    for key, value in state_vars.items():
        if not isinstance(value, torch.Tensor) or id(value) not in by_id:
            raise CheckpointError(f"state_dict entry '{key}' of {_qualname(model)} is not a parameter or buffer "
                                  "of a submodule; such models cannot be loaded from a plan")
        expected[key] = shapes[id(value)]
    stored = set(state) | set(aliases)
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected))
    if missing:
        raise CheckpointError(f"{weights_file}: missing key(s) {_few(missing)} of {_qualname(model)}")
    if unexpected:
        raise CheckpointError(f"{weights_file}: unexpected key(s) {_few(unexpected)} for {_qualname(model)}")
    for key, shape in expected.items():
        value = state[aliases.get(key, key)]
        if list(value.shape) != shape:
            raise CheckpointError(f"{weights_file}: '{key}' has shape {list(value.shape)}, the model after the "
                                  f"plan has {shape}")
        target = state_vars[key]
        if value.is_floating_point() != target.is_floating_point() or value.is_complex() != target.is_complex():
            raise CheckpointError(f"{weights_file}: '{key}' is {value.dtype}, the model's is {target.dtype}")
    # tied in the model: the file must hold one value for all its names
    first_key: dict[int, str] = {}
    for key, value in state_vars.items():
        other = first_key.setdefault(id(value), key)
        if other != key:
            a, b = aliases.get(other, other), aliases.get(key, key)
            if a != b and not torch.equal(state[a], state[b]):
                raise CheckpointError(f"{weights_file}: '{other}' and '{key}' are tied in the model but hold "
                                      "different values")
    return expected, built


def _check_attribute(module: nn.Module, label: str, attr: str, value: Any, where: str) -> None:
    if not isinstance(attr, str) or not has_attribute(module, attr):
        raise CheckpointError(f"{where}: module '{label}' ({type(module).__name__}) has no attribute '{attr}'")
    current = get_attribute(module, attr)
    if not isinstance(current, _PLAIN) or isinstance(current, nn.Module) or not _is_plain(value):
        raise CheckpointError(f"{where}: attribute '{label}.{attr}' cannot be set to {value!r} "
                              f"(current value is a {type(current).__name__}; a plan sets sizes only)")
    numeric = (int, float)
    if isinstance(current, (tuple, list)) != isinstance(value, (tuple, list)) or (
            isinstance(current, numeric) and not isinstance(current, bool)
            and not (isinstance(value, numeric) and not isinstance(value, bool))):
        raise CheckpointError(f"{where}: attribute '{label}.{attr}' is {current!r}, the plan sets {value!r} "
                              "(a different kind of value)")


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (type(None), bool, int, str))


def _replay_plan(model: nn.Module, plan: PruningPlan, tx: Transaction,
                 built: dict[tuple[int, str], nn.Module]) -> None:
    """Apply every recorded step in turn: its module replacements and shortened lists (the
    modules ``_validate`` built), its kept indices and its recorded attributes."""
    for i, step in enumerate(plan.steps, 1):
        if step.dropped:
            apply_drops(model, step.dropped, tx)
        for module_path in step.replaced:
            tx.replace_module(model, module_path, built[(i, module_path)])
        apply_plan(model, _removal_of(model, step), tx)


class _VirtualModel:
    """The model as the plan's block drops and module replacements so far leave it, without
    touching it: a skeleton of shallow module copies (sharing every tensor) that the plan's
    structural steps edit, with its tensors by name and its state_dict entries."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.skeleton = _skeleton(model, {})
        self._refresh()

    def _refresh(self) -> None:
        self.named = named_tensors(self.skeleton, remove_duplicate=False)
        self.state: dict[str, Any] = dict(self.skeleton.state_dict(keep_vars=True))

    def module(self, label: str) -> nn.Module:
        """The module at ``label`` (``AttributeError`` when there is none)."""
        return self.skeleton.get_submodule(label) if label else self.skeleton

    def replace(self, path: str, new: nn.Module) -> None:
        Transaction().replace_module(self.skeleton, path, new)
        self._refresh()

    def drop(self, dropped: list[str], where: str) -> None:
        try:
            apply_drops(self.skeleton, dropped, Transaction(), follow_config=False)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        self._refresh()


def _skeleton(module: nn.Module, copies: dict[int, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` and of its submodules (each copied once), sharing tensors."""
    if id(module) not in copies:
        shell = copy.copy(module)
        copies[id(module)] = shell
        object.__setattr__(shell, "_modules", {name: None if child is None else _skeleton(child, copies)
                                               for name, child in module._modules.items()})
    return copies[id(module)]


def _build_replacement(virtual: _VirtualModel, path: str, spec: dict[str, Any], where: str) -> nn.Module:
    """The module a step puts at ``path``, built from its allow-listed type and plain kwargs, on
    the device, in the floating dtype and in the training mode of the module it replaces."""
    type_name = spec["type"]
    try:
        old = virtual.module(path)
    except AttributeError:
        raise CheckpointError(f"{where}: the plan replaces module '{path}' by {type_name!r}, but the model "
                              f"({_qualname(virtual.model)}) has no such module") from None
    try:
        new = build_replacement(type_name, spec["init"])
    except ValueError as exc:
        raise CheckpointError(f"{where}: cannot replace module '{path}': {exc}") from None
    like = [t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()]
    like = like or [t for t in virtual.named.values() if t.is_floating_point()]
    if like:
        new.to(device=like[0].device, dtype=like[0].dtype)
    return new.train(old.training)


def _removal_of(model: nn.Module, step: PlanStep) -> RemovalPlan:
    """A recorded step as a :class:`RemovalPlan` (attribute values back in the types they replace)."""
    kept = {name: {dim: step.kept(name, dim) for dim in sorted(dims)} for name, dims in step.removed.items()
            if name not in step.renumbered}
    shapes = {name: tuple(len(kept[name][d]) if d in kept[name] else size for d, size in enumerate(step.shapes[name]))
              for name in kept}
    tensors = named_tensors(model)
    renumbered = {name: renumbered_index(tensors[name], step.kept(name, 0)) for name in step.renumbered}
    attributes = {}
    for label, attrs in step.attributes.items():
        module = model.get_submodule(label) if label else model
        attributes[label] = {attr: _coerce(get_attribute(module, attr), value) for attr, value in attrs.items()}
    return RemovalPlan(np.zeros(0, dtype=np.int64), kept, shapes, attributes, renumbered=renumbered)


def _coerce(current: Any, value: Any) -> Any:
    """JSON turned tuples into lists: give the value back the container type it replaces."""
    if isinstance(value, list) and isinstance(current, (tuple, list)):
        if isinstance(current, torch.Size):
            return torch.Size(value)
        return type(current)(value) if type(current) in (tuple, list) else tuple(value)
    if isinstance(current, float) and type(value) is int:
        return float(value)
    return value


def _set_weights(model: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str], tx: Transaction) -> None:
    """Give every parameter/buffer in the state_dict the saved value (cast to the model's dtype
    and device, like ``load_state_dict``) in place: the objects stay, so tied tensors stay tied
    and an optimizer built before ``load`` keeps training the model's parameters."""
    done: set[int] = set()
    for key, current in model.state_dict(keep_vars=True).items():
        if id(current) in done:
            continue
        done.add(id(current))
        stored = state[aliases.get(key, key)]
        value = stored.to(device=current.device, dtype=current.dtype).detach()
        if value.data_ptr() == stored.data_ptr():  # own, aligned memory (not a view into the file's buffer):
            value = value.clone()  # kernels pick alignment-dependent paths, outputs must be bit-identical
        tx.set_data(current, value)


def _final_check(model: nn.Module, expected: dict[str, list[int]]) -> None:
    actual = {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    if actual != expected:
        bad = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
        raise CheckpointError(f"after replaying the plan the model's state_dict differs at {_few(bad)}")


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _submodule(virtual: _VirtualModel, label: str, where: str) -> nn.Module:
    if not isinstance(label, str):
        raise CheckpointError(f"{where}: module name {label!r} is not a string")
    try:
        return virtual.module(label)
    except AttributeError:
        raise CheckpointError(f"{where}: the plan sets attributes of module '{label}', which the model "
                              f"({_qualname(virtual.model)}) does not have") from None


def _qualname(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _torchslim_version() -> str:
    import torchslim

    return getattr(torchslim, "__version__", "unknown")


def _few(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _dumps(data: Any, what: str) -> str:
    try:
        return json.dumps(data, indent=1, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} is not JSON-serialisable: {exc}") from None


def _parse_json(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _read_json(path: Path) -> Any:
    return _parse_json(path.read_bytes(), path)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tmp_path(directory: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(tmp)


def _write_text(target: Path, text: str) -> None:
    tmp = _tmp_path(target.parent, target.name)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
