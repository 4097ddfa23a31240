"""Measured speed: per-layer latency tables, whole-model latency on PyTorch and ONNX Runtime."""
from torchslim._timing import LatencyNoiseWarning
from torchslim.latency.lut import LatencyModel, LatencyTable
from torchslim.latency.runtime import best_of_rounds, make_runner, measure_in_turn, measure_model

__all__ = ["LatencyModel", "LatencyNoiseWarning", "LatencyTable", "best_of_rounds", "make_runner", "measure_in_turn",
           "measure_model"]
