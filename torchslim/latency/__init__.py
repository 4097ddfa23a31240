"""Measured speed: per-layer latency tables, whole-model latency on PyTorch and ONNX Runtime."""
from torchslim.latency.lut import LatencyModel, LatencyTable
from torchslim.latency.runtime import measure_model

__all__ = ["LatencyModel", "LatencyTable", "measure_model"]
