"""Unstructured sparsity: level pruning with masks kept through training, a per-layer report,
and compact export. Zeros do not speed up dense kernels; they shrink the stored model."""
from torchslim.sparsity.export import load_sparse, save_sparse
from torchslim.sparsity.level import LayerSparsity, sparsify_, sparsity_report
from torchslim.sparsity.masks import WeightMasks

__all__ = ["LayerSparsity", "WeightMasks", "load_sparse", "save_sparse", "sparsify_", "sparsity_report"]
