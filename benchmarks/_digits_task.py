"""The digits task every search benchmark shares: a model (the demo's CNN or a ResNet-18
adapted to 8x8 digits) trained per seed on scikit-learn's bundled digits, its train /
validation / test batches and the scoring (test accuracy after BatchNorm recalibration).

Imports only what runs on older torch too (the NNI anchor's environment needs torch 2.1), so
``benchmarks/search.py`` and the anchors' scripts train the same models the same way.
"""
from __future__ import annotations

import functools
import json

import torch
import torchvision
from torch import nn

import torchslim
from torchslim.demo import load_digits_tensors
from torchslim.models import create_model
from torchslim.recovery import evaluate_accuracy, finetune, recalibrate_bn_


def resnet18_digits() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build(name: str) -> nn.Module:
    return resnet18_digits() if name == "resnet18" else create_model("digits_cnn")


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int | None = None) -> list:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if seed is not None else \
        torch.arange(len(x))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(x), size)]


class Task:
    """One model trained on one seed's split, with the data every method shares."""

    def __init__(self, name: str, seed: int, train_epochs: int, calibration_batches: int = 4):
        x, y, x_test, y_test = load_digits_tensors(seed=seed)
        cut = int(0.8 * len(x))
        self.train = batches(x[:cut], y[:cut], 64, seed)
        self.val, self.test = batches(x[cut:], y[cut:], 256), batches(x_test, y_test, 256)
        self.calibration = self.train[:calibration_batches]
        self.example = (x[:1],)
        torch.manual_seed(seed)
        self.model = build(name)
        finetune(self.model, self.train, epochs=train_epochs, lr=2e-3, progress=False)
        self.model.eval()
        self.accuracy = evaluate_accuracy(self.model, self.test)

    @functools.cached_property
    def macs(self) -> int:
        """The trained model's MACs by torchslim's counter (imported here: the anchors' own
        environments run the task on older torch, where only the counter's tracer fails)."""
        from torchslim.graph import DependencyGraph
        from torchslim.graph.macs import estimate_macs

        return int(estimate_macs(DependencyGraph.build(self.model, self.example)))

    def score(self, model: nn.Module, split: list) -> float:
        recalibrate_bn_(model, (b[0] for b in self.calibration))
        return evaluate_accuracy(model, split)

    def search_kwargs(self, budget: float, seed: int) -> dict:
        return dict(target_macs=budget, seed=seed, data=[b[0] for b in self.calibration], recalibrate_bn=True,
                    config=torchslim.PruneConfig(exact_only=True))

    def finish(self, model: nn.Module, row: dict, finetune_epochs: int) -> dict:
        """``row`` completed the way every search benchmark scores a pruned model: parameters, test
        accuracy right after pruning (BatchNorm recalibrated), then after the same short fine-tune;
        printed as one JSON line."""
        row["params"] = sum(p.numel() for p in model.parameters())
        row["accuracy_after_pruning"] = self.score(model, self.test)
        finetune(model, self.train, epochs=finetune_epochs, lr=1e-3, progress=False)
        row["accuracy_after_finetune"] = evaluate_accuracy(model, self.test)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        return row
