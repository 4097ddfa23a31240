"""Grouped rewrite with channel permutations: a dense convolution becomes a convolution with g
groups (ResNeXt / ShuffleNet style, params and MACs divided by g) after permuting its input and
output channels so that as much weight energy as possible falls inside the g diagonal blocks.

Assignment method: with ``E[o, i] = ||W[o, i]||^2``, input channels are seeded into g equal
groups greedily by their affinity ``E^T E`` (channels feeding the same outputs go together),
then input and output groups are refined alternately, each step being the optimal balanced
assignment given the other side (a linear assignment problem over group slots, solved exactly
by ``scipy.optimize.linear_sum_assignment``); the in-block energy never decreases. Without data
the weights outside the blocks are dropped: the relative error is their energy over the
weight's, zero for an original that is block-diagonal up to permutation.

With data (``moment`` = ``C = E[x x^T]`` over the conv's unfolded input patches, channel-major:
column ``i*k*k + tap``, as ``torchslim.rewrite._stats`` collects it) the energy is the output
energy each weight slice carries on its own, ``E[o, i] = W[o, i] C_ii W[o, i]^T`` (``C_ii`` the
k*k x k*k diagonal block of channel i; cross-channel terms are left out), and the same balanced
search runs on it. Each output channel o of block b is then refitted by least squares on the
inputs it keeps, ``w'_o = argmin E||W_o x - w' x_B||^2 = (C_BB + lam I)^-1 C_B: W_o^T`` (B: the
columns of block b's input channels; ``lam = ridge * mean(diag C_BB)`` with ridge 1e-10, as in
the dilated fit, only there to keep a singular ``C_BB`` solvable), so the correlated inputs that
remain carry part of the dropped weights' effect. The weight-energy assignment is fitted the
same way and kept when its output error is the smaller, so the data never makes the fit worse
on the data than the data-free one (whose blocks are one candidate of the least squares); a
block-diagonal original is still reproduced exactly. The error is the relative output error on
the data, ``sqrt(tr(D C D^T) / tr(W C W^T))`` with ``D = W - W'`` (W' embedded in the dense
shape), as the other data-aware fits report. The bias is kept as it is: the moments are
uncentred and carry no input mean, so the mean of the dropped part cannot be absorbed into it.

:func:`fit_grouped` expresses the permutations as ``ChannelShuffle`` modules (a fixed
``index_select`` on the channel dimension, the general form of ShuffleNet's shuffle, Zhang et
al. 2018) around the grouped conv;
``rewrite_`` then folds each into the neighbouring layers where it can (``torchslim.rewrite.fold``:
the dependency group on that side is permuted instead, in every coupled tensor), so a folded
side has no shuffle and its channels prune like any others. A side that cannot be folded keeps
its shuffle, whose index buffer pruning renumbers (``DependencyGraph.index_buffers``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from torchslim.pruning import register_replacement_type
from torchslim.rewrite._fit import Fit, relative_error

REFINE_ROUNDS = 20


class ChannelShuffle(nn.Module):
    """Reorder the channels (dim 1): ``out[:, j] = x[:, order[j]]``."""

    order: torch.Tensor

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.order)

    def extra_repr(self) -> str:
        return f"channels={self.order.numel()}"


class GroupedConv2d(nn.Sequential):
    """``ChannelShuffle(in_order)``, ``Conv2d(in, out, k, groups=groups)``, ``ChannelShuffle(out_order)``.

    A side whose order is None (or the identity) has an ``nn.Identity`` in its place: no
    ``index_select`` runs there, and the conv stays at index 1, so parameter names
    (``name.1.weight``) do not depend on which sides were folded.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, groups: int, in_order: list[int] | None,
                 out_order: list[int] | None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                 bias: bool = True) -> None:
        super().__init__(shuffle_or_identity(in_order, in_channels, "in_order"),
                         nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, groups=groups, bias=bias),
                         shuffle_or_identity(out_order, out_channels, "out_order"))

    @property
    def conv(self) -> nn.Conv2d:
        """The grouped convolution (index 1)."""
        conv = self[1]
        assert isinstance(conv, nn.Conv2d)
        return conv

    def set_orders(self, in_order: Sequence[int] | None, out_order: Sequence[int] | None) -> None:
        """Replace both shuffles (None or the identity: none), keeping the conv and the device."""
        conv = self.conv
        self[0] = shuffle_or_identity(in_order, conv.in_channels, "in_order").to(conv.weight.device)
        self[2] = shuffle_or_identity(out_order, conv.out_channels, "out_order").to(conv.weight.device)

    @property
    def in_order(self) -> list[int] | None:
        """The input shuffle's order (None when the side has none)."""
        return self[0].order.tolist() if isinstance(self[0], ChannelShuffle) else None

    @property
    def out_order(self) -> list[int] | None:
        """The output shuffle's order (None when the side has none)."""
        return self[2].order.tolist() if isinstance(self[2], ChannelShuffle) else None


def shuffle_or_identity(order: Sequence[int] | None, channels: int, what: str) -> nn.Module:
    """A ``ChannelShuffle`` for ``order``, or ``nn.Identity`` when there is nothing to reorder."""
    if order is None:
        return nn.Identity()
    order = [int(i) for i in order]
    if sorted(order) != list(range(channels)):
        raise ValueError(f"{what} must be a permutation of range({channels}), got {len(order)} entries")
    return nn.Identity() if order == list(range(channels)) else ChannelShuffle(order)


def _init_of(m: Any) -> dict[str, Any]:
    conv = m[1]
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": list(conv.kernel_size),
            "groups": conv.groups, "in_order": m.in_order, "out_order": m.out_order,
            "stride": list(conv.stride), "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation), "bias": conv.bias is not None}


register_replacement_type(ChannelShuffle, "torchslim.rewrite.ChannelShuffle",
                          init_of=lambda m: {"order": m.order.tolist()})
register_replacement_type(GroupedConv2d, "torchslim.rewrite.GroupedConv2d", init_of=_init_of)


def max_groups(conv: Any) -> int:
    """The largest group count that divides both channel counts."""
    return math.gcd(conv.in_channels, conv.out_channels)


def groups_problem(conv: Any, groups: int) -> str | None:
    """Why ``groups`` cannot be used for ``conv`` (None when it can)."""
    if groups < 1 or conv.in_channels % groups or conv.out_channels % groups:
        return (f"groups={groups} does not divide its {conv.in_channels} input and {conv.out_channels} "
                "output channels")
    return None


def macs_per_position(conv: Any, groups: int | None) -> int:
    """MACs per output position of the conv, or of its g-grouped form (the shuffles cost no MACs)."""
    return conv.out_channels * conv.in_channels * conv.weight[0, 0].numel() // (groups or 1)


def _balanced(score: np.ndarray, groups: int) -> np.ndarray:
    """Optimal balanced assignment of rows to groups maximising ``score[row, group]`` (n/groups rows each)."""
    n = score.shape[0]
    slots = np.repeat(np.arange(groups), n // groups)
    rows, cols = linear_sum_assignment(-score[:, slots])
    out = np.empty(n, dtype=np.int64)
    out[rows] = slots[cols]
    return out


def _seed(energy: np.ndarray, groups: int) -> np.ndarray:
    """Greedy affinity seeding of the input channels into equal groups."""
    n = energy.shape[1]
    affinity = energy.T @ energy
    label = np.full(n, -1, dtype=np.int64)
    size = n // groups
    for g in range(groups):
        free = np.flatnonzero(label < 0)
        members = [free[np.argmax(energy[:, free].sum(0))]]
        label[members[0]] = g
        while len(members) < size:
            free = np.flatnonzero(label < 0)
            best = free[np.argmax(affinity[np.ix_(free, members)].sum(1))]
            label[best] = g
            members.append(best)
    return label


def channel_energy(conv: Any, moment: torch.Tensor | None = None) -> np.ndarray:
    """(Cout, Cin) energy of each weight slice ``W[o, i]``: ``||W[o, i]||^2`` without data, else the
    output energy it carries on its own, ``W[o, i] C_ii W[o, i]^T`` (``C_ii``: channel i's taps)."""
    if moment is None:
        return (conv.weight.detach().double().cpu() ** 2).sum((2, 3)).numpy()
    weight = conv.weight.detach().double().reshape(conv.out_channels, conv.in_channels, -1)
    taps = weight.shape[2]
    _check_moment(conv, moment, taps)
    c = moment.detach().double().to(weight.device)
    diag = torch.stack([c[i * taps:(i + 1) * taps, i * taps:(i + 1) * taps] for i in range(conv.in_channels)])
    energy = torch.einsum("oit,its,ois->oi", weight, diag, weight)
    return energy.clamp(min=0).cpu().numpy()


def _check_moment(conv: Any, moment: torch.Tensor, taps: int) -> None:
    dim = conv.in_channels * taps
    if tuple(moment.shape) != (dim, dim):
        raise ValueError(f"the input moment of a conv with {conv.in_channels} input channels and {taps} taps must "
                         f"be {dim} x {dim}, got {tuple(moment.shape)}")


def assign_groups(conv: Any, groups: int, moment: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input group, output group) per channel, maximising the (data-weighted) energy inside the blocks."""
    energy = channel_energy(conv, moment)
    in_label = _seed(energy, groups)
    out_label = np.zeros(energy.shape[0], dtype=np.int64)
    for _ in range(REFINE_ROUNDS):
        out_scores = np.stack([energy[:, in_label == g].sum(1) for g in range(groups)], 1)
        out_label = _balanced(out_scores, groups)
        in_scores = np.stack([energy[out_label == g].sum(0) for g in range(groups)], 1)
        new_in = _balanced(in_scores, groups)
        if np.array_equal(new_in, in_label):
            break
        in_label = new_in
    return in_label, out_label


def _orders(in_label: np.ndarray, out_label: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    in_order = np.concatenate([np.flatnonzero(in_label == g) for g in range(groups)])
    out_order = np.concatenate([np.flatnonzero(out_label == g) for g in range(groups)])
    return in_order, out_order


def grouped_errors(conv: Any, moment: torch.Tensor | None = None) -> dict[int, float]:
    """Relative fit error for every valid group count (on the data when ``moment`` is given)."""
    return {g: _grouped_weights(conv, g, moment)[3] for g in range(1, max_groups(conv) + 1)
            if groups_problem(conv, g) is None}


def _block_columns(channels: np.ndarray, taps: int) -> torch.Tensor:
    """The moment's columns of ``channels`` (in that order), each channel's taps together."""
    return (torch.as_tensor(channels, dtype=torch.long)[:, None] * taps + torch.arange(taps)).reshape(-1)


def _least_squares_block(weight: torch.Tensor, moment: torch.Tensor, columns: torch.Tensor,
                         ridge: float) -> torch.Tensor:
    """``(C_BB + lam I)^-1 C_B: W^T`` transposed: the rows' best weights on the columns ``B`` alone."""
    c_bb = moment[columns][:, columns]
    lam = ridge * float(c_bb.diagonal().mean().clamp(min=1e-30))
    c_bb = c_bb + lam * torch.eye(len(columns), dtype=c_bb.dtype, device=c_bb.device)
    return torch.linalg.solve(c_bb, moment[columns] @ weight.T).T


def _data_blocks(conv: Any, in_order: np.ndarray, out_order: np.ndarray, groups: int, moment: torch.Tensor,
                 ridge: float) -> tuple[list[torch.Tensor], float]:
    """The least-squares diagonal blocks (float64, grouped-conv layout) and the relative output error."""
    weight = conv.weight.detach().double().reshape(conv.out_channels, -1)
    taps = conv.weight[0, 0].numel()
    c = moment.detach().double().to(weight.device)
    n_in, n_out = conv.in_channels // groups, conv.out_channels // groups
    diff = weight.clone()
    blocks = []
    for g in range(groups):
        rows = torch.as_tensor(out_order[g * n_out:(g + 1) * n_out], dtype=torch.long, device=weight.device)
        columns = _block_columns(in_order[g * n_in:(g + 1) * n_in], taps).to(weight.device)
        fitted = _least_squares_block(weight[rows], c, columns, ridge)
        diff[rows[:, None], columns[None, :]] -= fitted
        blocks.append(fitted.reshape(n_out, n_in, *conv.weight.shape[2:]))
    error = relative_error(torch.trace(diff @ c @ diff.T), torch.trace(weight @ c @ weight.T))
    return blocks, error


def _data_fit(conv: Any, groups: int, moment: torch.Tensor,
              ridge: float) -> tuple[np.ndarray, np.ndarray, torch.Tensor, float]:
    """The least-squares fit on the data-weighted assignment, or on the weight-energy one when
    that gives the smaller output error (so the data never makes the fit worse on the data)."""
    best: tuple[np.ndarray, np.ndarray, list[torch.Tensor], float] | None = None
    candidates = [assign_groups(conv, groups, moment), assign_groups(conv, groups)]
    for i, labels in enumerate(candidates):
        if i and all(np.array_equal(a, b) for a, b in zip(labels, candidates[0])):
            break
        in_order, out_order = _orders(*labels, groups)
        blocks, error = _data_blocks(conv, in_order, out_order, groups, moment, ridge)
        if best is None or error < best[3]:
            best = (in_order, out_order, blocks, error)
    assert best is not None
    return best[0], best[1], torch.cat(best[2], 0).to(conv.weight.dtype), best[3]


def _grouped_weights(conv: Any, groups: int, moment: torch.Tensor | None,
                     ridge: float = 1e-10) -> tuple[np.ndarray, np.ndarray, torch.Tensor, float]:
    """(input order, output order, the grouped conv's weight, relative error) of the g-grouped fit."""
    if moment is not None:
        return _data_fit(conv, groups, moment, ridge)
    in_order, out_order = _orders(*assign_groups(conv, groups), groups)
    weight = conv.weight.detach()
    n_in, n_out = conv.in_channels // groups, conv.out_channels // groups
    blocks = [weight[out_order[g * n_out:(g + 1) * n_out]][:, in_order[g * n_in:(g + 1) * n_in]] for g in range(groups)]
    kept = sum(float((b.double() ** 2).sum()) for b in blocks)
    total = float((weight.double() ** 2).sum())
    return in_order, out_order, torch.cat(blocks, 0), relative_error(torch.tensor(total - kept), torch.tensor(total))


@torch.no_grad()
def fit_grouped(conv: Any, groups: int, moment: torch.Tensor | None = None, ridge: float = 1e-10) -> Fit:
    """The g-grouped form of ``conv`` between channel permutations: its diagonal blocks kept (no
    data) or refitted by least squares on ``moment`` = E[x x^T] of its unfolded input patches."""
    in_order, out_order, weight, error = _grouped_weights(conv, groups, moment, ridge)
    inverse_out = np.argsort(out_order)
    block: Any = GroupedConv2d(conv.in_channels, conv.out_channels, list(conv.kernel_size), groups, in_order.tolist(),
                               inverse_out.tolist(), list(conv.stride),
                               conv.padding if isinstance(conv.padding, str) else list(conv.padding),
                               list(conv.dilation), bias=conv.bias is not None)
    block = block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    block[1].weight.copy_(weight)
    if conv.bias is not None:
        block[1].bias.copy_(conv.bias[torch.as_tensor(out_order)])
    return Fit(block, error)
