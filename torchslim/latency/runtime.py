"""Whole-model latency on PyTorch eager or ONNX Runtime (CPU), warm-up, repeats, medians."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from torchslim._inputs import ExampleInputs, call_model, normalize_inputs
from torchslim._timing import LatencyStats, measure_latency


RUNTIMES = ("torch", "onnxruntime")


def measure_model(model: nn.Module, example_inputs: ExampleInputs, *, runtime: str = "torch", threads: int | None = 1,
                  warmup: int = 5, repeats: int = 30) -> LatencyStats:
    """Median latency of ``model`` on ``runtime`` ("torch" or "onnxruntime")."""
    model.eval()
    if runtime == "torch":
        return measure_latency(lambda: call_model(model, example_inputs), warmup=warmup, repeats=repeats, threads=threads)
    if runtime == "onnxruntime":
        return _measure_onnxruntime(model, example_inputs, threads, warmup, repeats)
    raise ValueError(f"runtime must be 'torch' or 'onnxruntime', got {runtime!r}")


def _measure_onnxruntime(model, example_inputs, threads, warmup, repeats) -> LatencyStats:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("runtime 'onnxruntime' needs onnxruntime: pip install 'torchslim[onnx]'") from None
    args, kwargs = normalize_inputs(example_inputs)
    if kwargs:
        raise ValueError("ONNX latency takes positional tensor inputs only")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        from torchslim.analysis._macs import fastpath_disabled

        with torch.no_grad(), fastpath_disabled():  # the fused MHA kernel has no ONNX export
            torch.onnx.export(model, tuple(args), str(path), dynamo=False, opset_version=17)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tensors = [a for a in args if isinstance(a, torch.Tensor)]  # Python flags are baked into the graph
        feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), tensors)}
        stats = measure_latency(lambda: session.run(None, feeds), warmup=warmup, repeats=repeats)
        stats.threads = threads or 0
        return stats
