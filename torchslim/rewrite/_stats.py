"""Second moments of the inputs each layer sees on user batches (for data-aware fits).

The fit of a linear map ``W`` on inputs ``x`` minimises ``E||(W - W') x||^2 = tr(E C E^T)`` with
``E = W - W'`` and ``C = E[x x^T]``; collecting ``C`` per layer (inputs as the rows a Linear
sees, or a convolution's unfolded patches) is all the data these fits need.
"""
from __future__ import annotations

from typing import Any, Iterable

import logging

import torch
import torch.nn.functional as F
from torch import nn

from torchslim._inputs import call_model
from torchslim.modes import training_mode

LOG = logging.getLogger("torchslim")
MAX_MOMENT_DIM = 8192  # a 8192 x 8192 float64 moment is 512 MB


def conv_padding(conv: Any) -> tuple[int, int]:
    """The convolution's zero padding as two ints ('same' with odd taps, 'valid')."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def input_rows(module: Any, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer multiplies by its weight matrix: features (Linear) or unfolded patches (conv)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=conv_padding(module), stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _row_entries(module: Any) -> int:
    return int(module.weight[0].numel())


@torch.no_grad()
def input_moments(model: nn.Module, names: list[str], batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """``{name: E[x x^T]}`` (float64) of each named layer's input rows over ``batches``.

    A layer whose rows have more than ``MAX_MOMENT_DIM`` entries (a D x D float64 matrix would
    not fit in memory: 1280 channels x 5x5 taps is 8 GB) is left out, with a warning on the
    ``torchslim`` logger; its fit then uses the weights only."""
    dims = {n: _row_entries(model.get_submodule(n)) for n in names}
    too_big = {n: d for n, d in dims.items() if d > MAX_MOMENT_DIM}
    for name, dim in too_big.items():
        LOG.warning("%s is fitted without data: its inputs have %d entries per row (more than MAX_MOMENT_DIM=%d)",
                    name, dim, MAX_MOMENT_DIM)
    names = [n for n in names if n not in too_big]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module: Any, args: tuple, output: Any) -> None:
            rows = input_rows(module, args[0].detach()).double()
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        with training_mode(model, False):  # eval: BatchNorm statistics are read, never updated
            for batch in batches:
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in sums]
    if missing:
        raise ValueError(f"the data batches never reached {', '.join(missing)}: cannot fit them on data")
    return {n: sums[n] / counts[n] for n in names}


def whitener(moment: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S_inv)`` with ``S S^T = C + eps*mean(diag C)*I``: the fit of ``W S`` in the plain
    Frobenius norm is the fit of ``W`` weighted by the data (SVD-LLM, Wang et al. 2024)."""
    d = moment.shape[0]
    ridge = eps * float(moment.diagonal().mean().clamp(min=1e-30))
    vals, vecs = torch.linalg.eigh(moment + ridge * torch.eye(d, dtype=moment.dtype, device=moment.device))
    vals = vals.clamp(min=ridge)
    return vecs * vals.sqrt(), (vecs / vals.sqrt()).T
