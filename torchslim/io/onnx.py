"""ONNX export of a (pruned) model, checked against onnxruntime on the same inputs.

``onnx`` and ``onnxruntime`` are optional extras (``pip install torchslim[onnx]``).
The TorchScript-based exporter (``dynamo=False``) is tried first: it works offline with
no further dependency. The ``torch.export``-based exporter needs ``onnxscript`` and is
used when asked for (``dynamo=True``) or as a fallback when the first one fails.

Hugging Face decoders export without their cache object (``use_cache=False``), or with
``kv_cache=True`` as a step of a generation loop: past keys and values in, logits and the
updated keys and values out, with free batch and sequence axes (see ``_decoder``).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim._inputs import ExampleInputs, iter_tensors, normalize_inputs
from torchslim.io._decoder import DecoderWithCache, is_hf_decoder, without_cache
from torchslim.modes import training_mode
from torchslim.pruning.verify import compare_outputs, run_eval

LOG = logging.getLogger(__name__)


class OnnxCheckError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's (the report is attached as ``.report``)."""

    def __init__(self, message: str, report: "OnnxExportReport"):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class OnnxExportReport:
    path: str
    exporter: str  # "torchscript" or "dynamo"
    opset: int | None
    file_bytes: int
    checked: bool
    ok: bool | None = None  # None when not checked
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    outputs: int | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def export_onnx(model: nn.Module, example_inputs: ExampleInputs, path: str | os.PathLike, *, check: bool = True,
                opset: int | None = None, dynamo: bool | None = None, kv_cache: bool = False, past_length: int = 4,
                atol: float = 1e-4, rtol: float = 1e-3, **export_kwargs: Any) -> OnnxExportReport:
    """Export ``model`` to ONNX at ``path`` and, with ``check``, compare onnxruntime with PyTorch.

    ``example_inputs``: a tensor, a tuple of inputs, or an ``(args, kwargs)`` pair. ``opset``:
    the ONNX opset (the exporter's default when None). ``dynamo``: None tries the
    TorchScript exporter then the torch.export one; True/False forces one. Extra keyword
    arguments (``input_names``, ``output_names``, ``dynamic_axes``...) go to
    ``torch.onnx.export``. The model is exported in eval mode; its training flags are restored.

    Hugging Face decoders: called with ``use_cache=False`` unless the inputs say otherwise.
    ``kv_cache=True`` exports one generation step instead (needs onnxscript): inputs
    ``input_ids``, ``attention_mask`` (past + new tokens) and ``past_key_values.{i}.key|value``,
    outputs ``logits`` and ``present.{i}.key|value``, batch and sequence axes dynamic; the
    example's ``input_ids`` are the new tokens after a past of ``past_length`` tokens, and the
    check runs at two lengths so that the free axes are checked too.

    Returns an :class:`OnnxExportReport` (max absolute/relative error when checked); raises
    :class:`OnnxCheckError` if onnxruntime's outputs differ beyond ``atol`` + ``rtol`` x the
    output's magnitude, and ``ImportError`` if a needed optional package is missing.
    """
    if check:
        _require("onnxruntime", "to check the exported model (check=False skips the check)")
    if kv_cache:
        dynamo = True
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        why = "for kv_cache=True" if kv_cache else "for the torch.export-based exporter (dynamo=True)"
        _require("onnxscript", why)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs = normalize_inputs(example_inputs)
    checks: list[tuple[tuple, dict]] = [(args, without_cache(model, kwargs))]
    if kv_cache:
        model, checks = _with_cache(model, args, kwargs, past_length, export_kwargs)
    args, kwargs = checks[0]
    if "input_names" not in export_kwargs:
        export_kwargs["input_names"] = [f"input_{i}" for i in range(len(list(iter_tensors((args, kwargs)))))]
    input_names = list(export_kwargs["input_names"])

    with training_mode(model, False):
        exporter = _export(model, args, kwargs, path, opset, dynamo, export_kwargs)
    report = OnnxExportReport(str(path), exporter, _opset_of(path), path.stat().st_size, checked=check)
    if not check:
        return report
    for inputs in checks:
        _check(model, inputs, path, input_names, atol, rtol, report)
    return report


def _with_cache(model: nn.Module, args: tuple, kwargs: dict, past_length: int,
                export_kwargs: dict[str, Any]) -> tuple[nn.Module, list[tuple[tuple, dict]]]:
    """The generation-step wrapper of a HF decoder, and its inputs at two lengths (the second
    a token shorter with a longer past) for the check."""
    step = DecoderWithCache(model)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError("kv_cache=True needs the example's input_ids (as the first input or input_ids=...)")
    if input_ids.shape[0] == 1:
        input_ids = input_ids.repeat(2, 1)  # an example batch of 1 would fix the batch axis at 1
    first = step.example_inputs(input_ids, past_length)
    second = step.example_inputs(input_ids[:, : max(1, input_ids.shape[1] - 1)], past_length + 1)
    n_past = len(first) - 2
    names_in, names_out = step.names(n_past)
    export_kwargs.setdefault("input_names", names_in)
    export_kwargs.setdefault("output_names", names_out)
    export_kwargs.setdefault("dynamic_shapes", step.dynamic_shapes(n_past))
    return step, [(first, {}), (second, {})]


def _check(model: nn.Module, inputs: tuple[tuple, dict], path: Path, input_names: list[str], atol: float,
           rtol: float, report: OnnxExportReport) -> None:
    """Compare onnxruntime with PyTorch on ``inputs``; fills ``report``, raises on a mismatch."""
    flat_inputs = list(iter_tensors(inputs))
    expected = run_eval(model, inputs)
    actual = _run_onnxruntime(path, dict(zip(input_names, flat_inputs)))
    verdict = compare_outputs([t.detach().cpu() for t in expected], actual, atol, rtol)
    report.ok, report.outputs, report.message = verdict.ok, verdict.outputs, verdict.message
    report.max_abs_error = max(report.max_abs_error or 0.0, verdict.max_abs_error)
    report.max_rel_error = max(report.max_rel_error or 0.0, verdict.max_rel_error)
    if not verdict.ok:
        raise OnnxCheckError(f"{path}: onnxruntime's outputs differ from PyTorch's: {verdict.message} "
                             f"(max abs error {verdict.max_abs_error:.3g}, atol {atol}, rtol {rtol})", report)


class _Positional(nn.Module):
    """Calls ``model`` with the example inputs' structure, taking their tensors as flat positional
    inputs: keyword-only and nested inputs export the same way, in ``iter_tensors`` order."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.model = model
        self._structure = (args, kwargs)

    def forward(self, *tensors: torch.Tensor) -> Any:
        args, kwargs = _substitute(self._structure, iter(tensors))
        return self.model(*args, **kwargs)


def _substitute(obj: Any, tensors) -> Any:
    """``obj`` with each tensor replaced by the next of ``tensors`` (the order of ``iter_tensors``)."""
    if isinstance(obj, torch.Tensor):
        return next(tensors)
    if isinstance(obj, dict):
        items = [(k, _substitute(v, tensors)) for k, v in obj.items()]
        try:
            return type(obj)(items)
        except Exception:  # noqa: BLE001 - a dict subclass with another constructor
            return dict(items)
    if isinstance(obj, (tuple, list)):
        values = [_substitute(v, tensors) for v in obj]
        return type(obj)(*values) if hasattr(obj, "_fields") else type(obj)(values)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, _substitute(getattr(obj, f.name), tensors))
        return new
    return obj


def _export(model, args, kwargs, path, opset, dynamo, export_kwargs) -> str:
    order = [False, True] if dynamo is None else [bool(dynamo)]
    if dynamo is None and importlib.util.find_spec("onnxscript") is None:
        order = [False]
    elif dynamo is None and is_hf_decoder(model):  # TorchScript's exporter fails on their masks (aten::diff)
        order = [True, False]
    wrapper = _Positional(model, args, kwargs).eval()
    flat = list(iter_tensors((args, kwargs)))
    if "dynamic_shapes" in export_kwargs:  # one entry per flat input; the wrapper takes them as *tensors
        export_kwargs = {**export_kwargs, "dynamic_shapes": (tuple(export_kwargs["dynamic_shapes"]),)}
    errors = []
    for use_dynamo in order:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter warns
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                quiet = {"verbose": False} if use_dynamo else {}  # no per-stage progress lines
                torch.onnx.export(wrapper, tuple(flat), str(path), opset_version=opset, dynamo=use_dynamo,
                                  **{**quiet, **export_kwargs})
            return "dynamo" if use_dynamo else "torchscript"
        except Exception as exc:  # noqa: BLE001 - try the other exporter, report both
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}")
            LOG.info("ONNX export of %s: %s", type(model).__name__, errors[-1].splitlines()[0])
    hint = "" if importlib.util.find_spec("onnxscript") else " (the torch.export-based exporter needs onnxscript)"
    raise RuntimeError(f"ONNX export of {type(model).__name__} failed{hint}:\n" + "\n".join(errors))


def _run_onnxruntime(path: Path, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {}
    for graph_input in session.get_inputs():
        if graph_input.name not in inputs:
            raise RuntimeError(f"{path}: the ONNX graph expects input '{graph_input.name}', which is not among "
                               f"the example inputs ({', '.join(inputs) or 'none'})")
        feed[graph_input.name] = inputs[graph_input.name].detach().cpu().numpy()
    return [torch.from_numpy(out) if hasattr(out, "dtype") else torch.as_tensor(out) for out in session.run(None, feed)]


def _opset_of(path: Path) -> int | None:
    if importlib.util.find_spec("onnx") is None:
        return None
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _require(package: str, why: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{package} is needed {why}: pip install 'torchslim[onnx]'")
