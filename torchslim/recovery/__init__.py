"""Getting accuracy back after pruning: fine-tuning (optionally distilled from the unpruned
model, on its logits and, with :class:`LayerDistiller`, on the hidden states of mapped
layers), BatchNorm recalibration and a top-1 accuracy helper. See ``_train`` for the batch
forms every helper accepts."""
from __future__ import annotations

from torchslim.recovery._train import (FinetuneResult, distillation_loss, evaluate_accuracy, finetune,
                                       recalibrate_bn_)
from torchslim.recovery.layers import LayerDistiller

__all__ = ["FinetuneResult", "LayerDistiller", "distillation_loss", "evaluate_accuracy", "finetune",
           "recalibrate_bn_"]
