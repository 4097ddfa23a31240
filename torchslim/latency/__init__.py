"""Measured speed: per-layer latency tables, whole-model latency on PyTorch and ONNX Runtime."""
from torchslim.latency.lut import LatencyModel, LatencyTable
from torchslim.latency.runtime import make_runner, measure_model, min_of_medians

__all__ = ["LatencyModel", "LatencyTable", "make_runner", "measure_model", "min_of_medians"]
