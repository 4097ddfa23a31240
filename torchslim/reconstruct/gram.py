"""Calibration statistics for reconstruction: the Gram matrix ``X^T X`` of a layer's inputs
(a Linear's input rows; a convolution's unfolded input patches), with a column of ones appended
when the layer has a bias (so that least squares can move the removed channels' mean into it).
Accumulated in float64 over the user's batches: memory is (columns + 1)^2 per layer whatever
the number of batches, and the sum over batches equals one batch of all rows. Under torchrun
each rank passes its own batches and the sums are reduced over the ranks, so every rank fits
the same weights as one process on all the batches."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._inputs import call_model
from torchslim.distributed import all_reduce_arrays, all_reduce_tensors_


CONSUMERS = (nn.Linear, nn.Conv2d)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by its weight: (rows, in) for a Linear, (rows, in*k*k) for a
    convolution (``F.unfold`` with its kernel, stride, padding and dilation; channel-major, the
    order of ``weight.reshape(out, -1)``)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(f"reconstruction takes ungrouped zero-padded convolutions, not {module}")
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # (N, in*k*k, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise TypeError(f"reconstruction takes Linear and Conv2d layers, not {type(module).__name__}")


class GramCollector:
    """Forward hooks on ``layers`` (name -> module) that add each call's ``[X, 1]^T [X, 1]``
    (``[X]`` without a bias) to ``grams[name]``; ``rows[name]`` counts the rows seen."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> "GramCollector":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.add(name, module, args[0])
        return hook

    def add(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        rows = input_rows(module, x.detach()).double()
        if getattr(module, "bias", None) is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], dim=1)
        gram = rows.T @ rows
        self.grams[name] = self.grams[name] + gram if name in self.grams else gram
        self.rows[name] = self.rows.get(name, 0) + rows.shape[0]


def _inputs_of(batch: Any) -> Any:
    """A batch's model inputs: an ``(input, integer targets)`` pair gives its input; anything
    else is taken as example inputs (a tensor, a tuple of positional inputs, ``(args, kwargs)``)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor) \
            and not batch[1].is_floating_point():
        return batch[0]
    return batch


@torch.no_grad()
def collect_grams(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any]) -> GramCollector:
    """Run ``model`` in eval mode on ``batches`` (example-input forms: a tensor, a tuple of
    positional inputs, ``(args, kwargs)``; or ``(input, integer targets)`` pairs) and return the
    Gram matrices of ``layers``' inputs."""
    was_training = model.training
    model.eval()
    collector = GramCollector(layers)
    used = 0
    try:
        with collector:
            for batch in batches:
                call_model(model, _inputs_of(batch))
                used += 1
    finally:
        model.train(was_training)
    if used == 0:
        raise ValueError("no calibration batches: reconstruction needs data")
    names = sorted(collector.grams)  # under torchrun: every rank's batches, in one order on every rank
    all_reduce_tensors_([collector.grams[name] for name in names])
    collector.rows.update(all_reduce_arrays({name: collector.rows[name] for name in names}))
    return collector


@torch.no_grad()
def collect_paired(original: nn.Module, pruned: nn.Module, name: str, batches: Iterable[Any]) -> dict[str, Any]:
    """For layer ``name``: the statistics of its inputs in ``original`` (X) and in ``pruned`` (Y,
    the channels it still reads, as the pruned model computes them) on the same batches:
    ``G = X^T X``, ``A = Y^T Y``, ``C = Y^T X`` (ones columns appended when the layer has a bias)
    and the row count."""
    layers = (original.get_submodule(name), pruned.get_submodule(name))
    seen: list[torch.Tensor | None] = [None, None]
    stats: dict[str, Any] = {"rows": 0}

    def catcher(i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            rows = input_rows(module, args[0].detach()).double()
            if getattr(module, "bias", None) is not None:
                rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], dim=1)
            seen[i] = rows
        return hook

    handles = [layer.register_forward_hook(catcher(i)) for i, layer in enumerate(layers)]
    modes = (original.training, pruned.training)
    original.eval(), pruned.eval()
    try:
        for batch in batches:
            inputs = _inputs_of(batch)
            call_model(original, inputs)
            call_model(pruned, inputs)
            x, y = seen
            if x is None or y is None:
                raise ValueError(f"layer '{name}' did not run on a calibration batch")
            for key, value in (("G", x.T @ x), ("A", y.T @ y), ("C", y.T @ x)):
                stats[key] = stats[key] + value if key in stats else value
            stats["rows"] += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        original.train(modes[0]), pruned.train(modes[1])
    if stats["rows"] == 0:
        raise ValueError("no calibration batches: reconstruction needs data")
    all_reduce_tensors_([stats["G"], stats["A"], stats["C"]])  # under torchrun: every rank's batches
    stats["rows"] = int(all_reduce_arrays({"rows": stats["rows"]})["rows"])
    return stats
