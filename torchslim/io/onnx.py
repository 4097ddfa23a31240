"""ONNX export of a (pruned) model, checked against onnxruntime on the same inputs.

``onnx`` and ``onnxruntime`` are optional extras (``pip install torchslim[onnx]``).
The TorchScript-based exporter (``dynamo=False``) is tried first: it works offline with
no further dependency. The ``torch.export``-based exporter needs ``onnxscript`` and is
used when asked for (``dynamo=True``) or as a fallback when the first one fails.
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
                opset: int | None = None, dynamo: bool | None = None, atol: float = 1e-4, rtol: float = 1e-3,
                **export_kwargs: Any) -> OnnxExportReport:
    """Export ``model`` to ONNX at ``path`` and, with ``check``, compare onnxruntime with PyTorch.

    ``example_inputs``: a tensor, a tuple of inputs, or an ``(args, kwargs)`` pair. ``opset``:
    the ONNX opset (the exporter's default when None). ``dynamo``: None tries the
    TorchScript exporter then the torch.export one; True/False forces one. Extra keyword
    arguments (``input_names``, ``output_names``, ``dynamic_axes``...) go to
    ``torch.onnx.export``. The model is exported in eval mode; its training flags are restored.

    Returns an :class:`OnnxExportReport` (max absolute/relative error when checked); raises
    :class:`OnnxCheckError` if onnxruntime's outputs differ beyond ``atol`` + ``rtol`` x the
    output's magnitude, and ``ImportError`` if a needed optional package is missing.
    """
    if check:
        _require("onnxruntime", "to check the exported model (check=False skips the check)")
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        _require("onnxscript", "for the torch.export-based exporter (dynamo=True)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs = normalize_inputs(example_inputs)
    flat_inputs = list(iter_tensors((args, kwargs)))
    if "input_names" not in export_kwargs:
        export_kwargs["input_names"] = [f"input_{i}" for i in range(len(flat_inputs))]
    input_names = list(export_kwargs["input_names"])

    with training_mode(model, False):
        exporter = _export(model, args, kwargs, path, opset, dynamo, export_kwargs)
    report = OnnxExportReport(str(path), exporter, _opset_of(path), path.stat().st_size, checked=check)
    if not check:
        return report

    expected = run_eval(model, example_inputs)
    actual = _run_onnxruntime(path, dict(zip(input_names, flat_inputs)))
    verdict = compare_outputs([t.detach().cpu() for t in expected], actual, atol, rtol)
    report.ok, report.outputs, report.message = verdict.ok, verdict.outputs, verdict.message
    report.max_abs_error, report.max_rel_error = verdict.max_abs_error, verdict.max_rel_error
    if not verdict.ok:
        raise OnnxCheckError(f"{path}: onnxruntime's outputs differ from PyTorch's: {verdict.message} "
                             f"(max abs error {verdict.max_abs_error:.3g}, atol {atol}, rtol {rtol})", report)
    return report


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
    wrapper = _Positional(model, args, kwargs).eval()
    flat = list(iter_tensors((args, kwargs)))
    errors = []
    for use_dynamo in order:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)  # the legacy exporter warns
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                torch.onnx.export(wrapper, tuple(flat), str(path), opset_version=opset, dynamo=use_dynamo,
                                  **export_kwargs)
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
