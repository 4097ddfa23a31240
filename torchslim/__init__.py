"""torchslim: analyse, prune, physically slim, verify and export PyTorch models.

Front door::

    report = torchslim.analyze(model, example_inputs)
    result = torchslim.prune_(model, example_inputs, torchslim.PruneConfig(ratio=0.5))
    torchslim.verify(original, model, example_inputs, result.plan)
    torchslim.save(model, "pruned/"); torchslim.load("pruned/", fresh_original)

Names are imported lazily so that ``import torchslim`` and the CLI start fast. What the library
skips or falls back on (ops without a channel rule, groups left out and why, rolled-back
removals, a lifted cap, the other ONNX exporter) is logged on the ``torchslim`` logger:
``logging.basicConfig(level=logging.INFO)`` (or ``torchslim -v``) shows it.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())  # silent unless the application configures logging

_EXPORTS = {
    "AnalysisReport": "torchslim.analysis",
    "analyze": "torchslim.analysis",
    "DependencyGraph": "torchslim.graph",
    "register_module_rule": "torchslim.graph",
    "op_rule": "torchslim.graph",
    "PruneConfig": "torchslim.pruning",
    "SensitivitySearch": "torchslim.search",
    "NetAdaptSearch": "torchslim.search",
    "AnnealingSearch": "torchslim.search",
    "PruneResult": "torchslim.pruning",
    "PruningPlan": "torchslim.pruning",
    "PruningError": "torchslim.pruning",
    "prune_": "torchslim.pruning",
    "prune_depth_": "torchslim.pruning",
    "prune_experts_": "torchslim.pruning",
    "pruning_history": "torchslim.pruning.plan",
    "StaleOptimizerStateError": "torchslim.pruning._optimizer_state",
    "verify": "torchslim.pruning",
    "VerifyReport": "torchslim.pruning",
    "register_module_handler": "torchslim.pruning",
    "replace_module_": "torchslim.pruning",
    "sort_channels_": "torchslim.pruning",
    "reconstruct_": "torchslim.reconstruct",
    "make_slimmable": "torchslim.slimmable",
    "register_replacement_type": "torchslim.pruning",
    "config_from_recipe": "torchslim.pruning",
    "sparsify_": "torchslim.sparsity",
    "sparsity_report": "torchslim.sparsity",
    "save_sparse": "torchslim.sparsity",
    "load_sparse": "torchslim.sparsity",
    "bn_l1_penalty": "torchslim.criteria",
    "AGPPruner": "torchslim.schedules",
    "prune_iteratively": "torchslim.schedules",
    "save": "torchslim.io",
    "load": "torchslim.io",
    "export_onnx": "torchslim.io",
    "CheckpointError": "torchslim.io",
    "training_mode": "torchslim.modes",
    "share_weights_": "torchslim.compress",
    "save_compressed": "torchslim.compress",
    "load_compressed": "torchslim.compress",
    "NetworkSurgery": "torchslim.compress",
    "rewrite_": "torchslim.rewrite",
    "RewriteConfig": "torchslim.rewrite",
}

__all__ = list(_EXPORTS) + ["__version__"]  # dir() sorts


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
