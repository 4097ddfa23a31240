"""Save / load pruned checkpoints (safetensors + JSON plan, never pickle) and export to ONNX."""
from torchslim.io.onnx import OnnxCheckError, OnnxExportReport, export_onnx
from torchslim.io.serialization import CheckpointError, load, read_metadata, save

__all__ = ["save", "load", "read_metadata", "export_onnx", "CheckpointError", "OnnxExportReport", "OnnxCheckError"]
