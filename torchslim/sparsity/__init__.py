"""Unstructured sparsity: level pruning with masks kept through training, masks that keep the
dense weight (network surgery), a per-layer report, and compact export. Zeros do not speed up
dense kernels; they shrink the stored model."""
from torchslim.sparsity.export import load_sparse, save_sparse
from torchslim.sparsity.level import LayerSparsity, sparsify_, sparsity_report
from torchslim.sparsity.masks import WeightMasks
from torchslim.sparsity.parametrize import (MaskParametrization, live_parametrizations, mask_, masks_of,
                                            parametrization_problem, remove_masks_, set_mask_, update_masks_)

__all__ = ["LayerSparsity", "MaskParametrization", "WeightMasks", "live_parametrizations", "load_sparse", "mask_",
           "masks_of", "parametrization_problem", "remove_masks_", "save_sparse", "set_mask_", "sparsify_",
           "sparsity_report", "update_masks_"]
