"""The catalogue of rewrites: which layers each can take, its settings, MACs, errors and fit.

A *setting* is the one integer a rewrite is sized by: the rank (``lowrank``), the depth
multiplier (``separable``), the group count (``grouped``), or 1 (``dilated``, which has none).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from torchslim.rewrite import dilated, grouped, lowrank, separable
from torchslim.rewrite._fit import Fit

MAX_CANDIDATES = 24  # settings the budget planner weighs per layer


@dataclasses.dataclass(frozen=True)
class Method:
    """One rewrite: what it accepts, how it is sized, costed, scored and fitted."""

    name: str
    setting_name: str
    why_not: Callable[[Any], str | None]
    max_setting: Callable[[Any], int]
    macs_per_position: Callable[[Any, int | None], int]
    errors: Callable[[Any, torch.Tensor | None], dict[int, float]]
    fit: Callable[[Any, int, torch.Tensor | None], Fit]
    data_aware: bool
    check_setting: Callable[[Any, int], str | None] = lambda m, s: None

    def settings(self, module: Any) -> list[int]:
        """The settings that save MACs, at most MAX_CANDIDATES of them spread over the range."""
        full = self.macs_per_position(module, None)
        saving = [s for s in range(1, self.max_setting(module) + 1)
                  if self.check_setting(module, s) is None and self.macs_per_position(module, s) < full]
        if len(saving) <= MAX_CANDIDATES:
            return saving
        step = (len(saving) - 1) / (MAX_CANDIDATES - 1)
        return sorted({saving[round(i * step)] for i in range(MAX_CANDIDATES)})


def _dense_conv_problem(m: Any) -> str | None:
    if type(m) is not nn.Conv2d:
        return None
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} cannot be kept (only zero padding)"
    if m.groups != 1:
        return f"it is a grouped convolution (groups={m.groups}); rewrites take dense convolutions"
    return None


def _kinds(m: Any, kinds: tuple[type, ...], what: str) -> str | None:
    if type(m) not in kinds:
        return f"it is a {type(m).__qualname__}, not {what}"
    return _dense_conv_problem(m)


def _lowrank_why_not(m: Any) -> str | None:
    return _kinds(m, (nn.Linear, nn.Conv2d), "an nn.Linear or nn.Conv2d")


def _separable_why_not(m: Any) -> str | None:
    problem = _kinds(m, (nn.Conv2d,), "an nn.Conv2d")
    if problem is None and m.weight[0, 0].numel() == 1:
        problem = "it is a 1x1 convolution (nothing to separate)"
    return problem


def _dilated_why_not(m: Any) -> str | None:
    problem = _kinds(m, (nn.Conv2d,), "an nn.Conv2d")
    if problem is not None:
        return problem
    (kh, kw), (dh, dw) = m.kernel_size, m.dilation
    if kh != kw or kh < 5 or kh % 2 == 0 or dh != dw:
        return f"its kernel {kh}x{kw} (dilation {dh}x{dw}) is not a square odd kernel of 5x5 or more"
    return None


def _grouped_why_not(m: Any) -> str | None:
    return _kinds(m, (nn.Conv2d,), "an nn.Conv2d")


def _by_index(errors: torch.Tensor) -> dict[int, float]:
    return {r: float(e) for r, e in enumerate(errors.tolist())}


METHODS: dict[str, Method] = {
    "lowrank": Method("lowrank", "rank", _lowrank_why_not, lowrank.max_rank, lowrank.macs_per_position,
                      lambda m, c: _by_index(lowrank.lowrank_errors(m, c)), lowrank.fit_lowrank, data_aware=True),
    "separable": Method("separable", "multiplier", _separable_why_not, separable.max_multiplier,
                        separable.macs_per_position, lambda m, c: _by_index(separable.separable_errors(m)),
                        lambda m, s, c: separable.fit_separable(m, s), data_aware=False),
    "dilated": Method("dilated", "-", _dilated_why_not, lambda m: 1, lambda m, s: dilated.macs_per_position(m, s is not None),
                      lambda m, c: {1: dilated.fit_dilated(m, c).error}, lambda m, s, c: dilated.fit_dilated(m, c),
                      data_aware=True),
    "grouped": Method("grouped", "groups", _grouped_why_not, grouped.max_groups, grouped.macs_per_position,
                      grouped.grouped_errors, grouped.fit_grouped, data_aware=True, check_setting=grouped.groups_problem),
}
