"""How ``make_slimmable`` converts a model: the widths it runs at, how channels are ordered and
which groups stay at full width."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn


@dataclasses.dataclass
class SlimmableConfig:
    """``widths``: the configured widths (Slimmable Networks' switches; the sandwich rule's
    smallest and largest; one private BatchNorm each with ``switchable_bn``). ``width_range``:
    any width in this closed range runs (Universally Slimmable Networks); ``widths`` must lie in
    it. ``criterion`` orders each group's channels, most important first (a name in
    ``torchslim.criteria.CRITERIA`` or a callable). ``exclude`` (module globs) and ``filter_fn(name,
    module)`` keep groups at full width, as in ``PruneConfig``; ``round_to`` rounds each kept
    count to a multiple of that many channels."""

    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    width_range: tuple[float, float] | None = None
    criterion: Any = "l1"
    exclude: tuple[str, ...] = ()
    filter_fn: Callable[[str, nn.Module], bool] | None = None
    round_to: int = 1
    switchable_bn: bool = False

    def __post_init__(self) -> None:
        self.widths = tuple(sorted(float(w) for w in self.widths))
        if not self.widths:
            raise ValueError("SlimmableConfig.widths is empty: give at least one width in (0, 1]")
        for w in self.widths:
            check_width(w)
        if self.width_range is not None:
            low, high = (float(v) for v in self.width_range)
            check_width(low), check_width(high)
            if low > high:
                raise ValueError(f"SlimmableConfig.width_range {self.width_range}: the low end is above the high end")
            outside = [w for w in self.widths if not low <= w <= high]
            if outside:
                raise ValueError(f"SlimmableConfig.widths {outside} lie outside width_range ({low}, {high})")
            self.width_range = (low, high)
        if self.switchable_bn and self.width_range is not None:
            raise ValueError("switchable_bn keeps one BatchNorm per configured width, so it cannot serve a "
                             "width_range; use shared BatchNorm with calibrate_bn (as US-Nets) instead")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"SlimmableConfig.round_to must be a positive integer, got {self.round_to!r}")

    @property
    def smallest(self) -> float:
        return self.width_range[0] if self.width_range is not None else self.widths[0]

    @property
    def largest(self) -> float:
        return self.width_range[1] if self.width_range is not None else self.widths[-1]

    def allows(self, width: float) -> bool:
        """Whether ``width`` is one this model was made to run at."""
        if self.width_range is not None:
            return self.width_range[0] - 1e-9 <= width <= self.width_range[1] + 1e-9
        return any(abs(width - w) < 1e-9 for w in self.widths)


def check_width(width: Any) -> float:
    """A width is a number in (0, 1]."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < float(width) <= 1:
        raise ValueError(f"a width must be a number in (0, 1], got {width!r}")
    return float(width)
