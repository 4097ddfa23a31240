"""The typed pruning config: one frozen dataclass, validated before anything is touched."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from torch import nn

ModuleFilter = Callable[[str, nn.Module], bool]


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much.

    ratio:        fraction of each group's channels to remove, in [0, 1).
    criterion:    importance criterion name (``"l1"``, ``"l2"``, ``"random"``) or an Importance object.
    op_names:     fnmatch globs over module names; only groups holding these modules' output
                  channels are pruned (with everything coupled to them). None = all modules.
    exclude:      fnmatch globs; groups holding these modules' output channels are kept.
    filter_fn:    ``(name, module) -> bool``; False keeps the module's output channels.
    target_macs:  prune until MACs <= target (a fraction of the original if <= 1, else absolute);
                  the ratio then is searched and ``ratio`` is its upper bound.
    round_to:     keep a multiple of this many channels (atoms) per group.
    min_channels: never keep fewer than this many atoms in a group.
    exact_only:   skip groups whose channels feed a statistic over the channel dim (LayerNorm,
                  softmax, mean), where removal is not identical to zeroing.
    seed:         seed for the random criterion.
    verify:       compare the pruned model with the zeroed original on the example inputs and
                  roll back on mismatch.
    """

    ratio: float = 0.5
    criterion: object = "l1"
    op_names: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    filter_fn: ModuleFilter | None = None
    target_macs: float | None = None
    round_to: int = 1
    min_channels: int = 1
    exact_only: bool = False
    seed: int = 0
    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"PruneConfig.ratio must be in [0, 1), got {self.ratio}")
        if int(self.round_to) < 1:
            raise ValueError(f"PruneConfig.round_to must be >= 1, got {self.round_to}")
        if int(self.min_channels) < 1:
            raise ValueError(f"PruneConfig.min_channels must be >= 1, got {self.min_channels}")
        if self.target_macs is not None and not float(self.target_macs) > 0:
            raise ValueError(f"PruneConfig.target_macs must be > 0, got {self.target_macs}")
        if isinstance(self.op_names, str) or isinstance(self.exclude, str):
            raise ValueError("PruneConfig.op_names and PruneConfig.exclude take a list of glob patterns, not a string")
        if isinstance(self.criterion, str):
            from torchslim.criteria import CRITERIA

            if self.criterion not in CRITERIA:
                raise ValueError(f"PruneConfig.criterion {self.criterion!r} is unknown; choose one of {sorted(CRITERIA)}")
