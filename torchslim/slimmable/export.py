"""Export a width as an ordinary model: the slimmable model's channels at that width,
physically kept through the engine (``torchslim.pruning.remove_``), saved and loaded like any
pruned model."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.graph import DependencyGraph
from torchslim.pruning import InexactPruningWarning, remove_
from torchslim.pruning.verify import compare_outputs, run_eval, tolerances
from torchslim.slimmable.slimmable import Slimmable, Width, copy_without_hooks


def export_width(slim: Slimmable, width: Width, example_inputs: ExampleInputs) -> nn.Module:
    """A physically smaller copy of ``slim.model`` at ``width`` (the slimmable model is not
    changed). With switchable BatchNorm the copy takes that width's private BatchNorm. Its
    outputs on ``example_inputs`` are checked against the slimmable model at that width;
    a mismatch raises ``RuntimeError``."""
    with slim.at_width(width), torch.no_grad():
        expected = run_eval(slim.model, example_inputs)
        private = slim.batchnorm_values(width) or {}
    clone = copy_without_hooks(slim)
    graph = DependencyGraph.build(clone, example_inputs)
    if graph.n_atoms != slim.graph.n_atoms or len(graph.groups) != len(slim.graph.groups):
        raise RuntimeError("the model traces differently from when it was made slimmable; export at the width "
                           "it was traced with (same input shapes)")
    with warnings.catch_warnings():  # inexact groups: checked below against the slimmable model instead
        warnings.simplefilter("ignore", InexactPruningWarning)
        remove_(graph, slim.removed_atoms(width), example_inputs, verify=False)
    _load_private_batchnorms(clone, private)
    actual = run_eval(clone, example_inputs)
    atol, rtol = tolerances([*expected, *clone.parameters()])
    report = compare_outputs(expected, actual, atol, rtol)
    if not report.ok:
        raise RuntimeError(f"the exported model differs from the slimmable model at width {width}: {report.message}")
    return clone.train(slim.model.training)


def _load_private_batchnorms(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, value in values.items():
            target = tensors[name]
            if tuple(target.shape) != tuple(value.shape):
                raise RuntimeError(f"private BatchNorm tensor '{name}' has shape {tuple(value.shape)}, the exported "
                                   f"model {tuple(target.shape)}")
            target.copy_(value)
