"""The typed pruning config: one frozen dataclass, validated before anything is touched.

Its fields come in five parts, each a frozen dataclass of its own that states the defaults:
:class:`Scope` (what may be pruned), :class:`Amount` (how much: a ratio or one target),
:class:`Ranking` (how channels compete), :class:`LatencyOptions` (where latency is measured)
and :class:`Verification` (how the result is checked). ``PruneConfig(ratio=0.3, ...)`` (flat
keywords, as recipes use) and ``PruneConfig.from_parts(Amount(target_macs=0.5), Ranking(...))``
build the same object; ``config.amount``, ``config.ranking``... read a part back, and
``config.target`` is the one spelling of "which target, if any"."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from torch import nn

from torchslim.latency.runtime import RUNTIMES

ModuleFilter = Callable[[str, nn.Module], bool]


@dataclasses.dataclass(frozen=True)
class Scope:
    """What may be pruned: module globs to prune (``op_names``) or keep (``exclude``: outputs,
    ``protect_inputs``: inputs) and a ``filter_fn(name, module) -> bool``."""

    op_names: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    filter_fn: ModuleFilter | None = None
    protect_inputs: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class Amount:
    """How much: a ``ratio`` per group (``ratios`` per module glob or group id), or one target
    (MACs, params or latency), never fewer than ``min_channels`` atoms per group."""

    ratio: float = 0.5
    ratios: dict[str | int, float] | None = None
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    min_channels: int = 1


@dataclasses.dataclass(frozen=True)
class Ranking:
    """How channels compete: the importance ``criterion`` and how atoms of different groups are
    compared (``global_ranking``, ``latency_aware``), in which widths (``round_to``), how much
    one group may lose (``max_sparsity_per_layer``) and whether inexact groups may be used."""

    criterion: object = "l1"
    global_ranking: bool = False
    latency_aware: bool | None = None
    round_to: int | str | None = None
    max_sparsity_per_layer: float | None = None
    exact_only: bool | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LatencyOptions:
    """Where latency is measured: the runtime the model ships on and its thread count."""

    latency_threads: int = 1
    latency_runtime: str = "torch"


@dataclasses.dataclass(frozen=True)
class Verification:
    """How the result is checked against the zeroed original (tolerances by dtype when None) and
    how far inexact groups may move the outputs."""

    verify: bool = True
    atol: float | None = None
    rtol: float | None = None
    max_inexact_deviation: float | None = 0.75


PARTS: dict[str, type] = {"scope": Scope, "amount": Amount, "ranking": Ranking, "latency": LatencyOptions,
                          "verification": Verification}
TARGET_FIELDS = ("target_macs", "target_params", "target_latency")


@dataclasses.dataclass(frozen=True)
class Target:
    """The config's target: ``field`` (``"target_macs"``, ``"target_params"`` or
    ``"target_latency"``) and its ``value`` (a fraction of the original if <= 1, else absolute:
    MACs, parameters or milliseconds)."""

    field: str
    value: float

    @property
    def quantity(self) -> str:
        """``"macs"``, ``"params"`` or ``"latency"``."""
        return self.field.removeprefix("target_")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """What to prune and how much.

    ratio:        fraction of each group's channels to remove, in [0, 1).
    criterion:    importance criterion name (``"l1"``, ``"l2"``, ``"random"``) or an Importance object.
    op_names:     fnmatch globs over module names; only groups holding these modules' output
                  channels (or widths inside them, such as a fused experts tensor's hidden
                  units) are pruned (with everything coupled to them). None = all modules.
    exclude:      fnmatch globs; groups holding these modules' output channels are kept.
    filter_fn:    ``(name, module) -> bool``; False keeps the module's output channels.
    target_macs:  prune until MACs <= target (a fraction of the original if <= 1, else absolute);
                  the ratio then is searched (up to 0.95 per group) and ``ratio`` is not used.
                  Where a ratio step moves coarse atoms in many groups at once (a head in every
                  block), the search finishes with single steps of each group (FFN units,
                  channels, in ``round_to`` multiples), so the result lands within one such
                  step of the target instead of a whole ratio step under it.
                  By default (``latency_aware``, ``global_ranking``, ``round_to`` and
                  ``max_sparsity_per_layer`` left unset) atoms are ranked across groups by time
                  saved per MAC saved, the time estimated from shapes without measuring
                  (``torchslim.latency.lut.CostModel``: MACs at dense or depthwise speed,
                  activation traffic, thin layers slower per MAC), so the MACs budget is spent
                  where the time per MAC is highest; widths are kept in multiples of 8 channels
                  and no group loses more than 60% of the width it had before any pruning
                  (earlier ``prune_`` calls count) unless the target needs it.
    round_to:     keep a multiple of this many channels per group (an atom of several channels,
                  e.g. a 64-dim attention head, counts as that many); ``"latency"`` picks,
                  per group, the kept width whose measured latency is lowest among the exact
                  width and its roundings up to 4/8/16/32 (a wider width wins ties), so pruning
                  never lands on a width slower than a wider one. None (default): 8 under the
                  default MACs-target ranking, else 1.
    target_latency: prune until the predicted latency (per-layer table measured on this machine,
                  see ``torchslim.latency``) is <= target: a fraction of the measured original if
                  <= 1, else milliseconds. ``latency_threads`` fixes the thread count measured,
                  ``latency_runtime`` the runtime you deploy on ("torch" or "onnxruntime":
                  their kernels favour different widths, so prune for the one you ship).
    latency_aware: rank atoms across groups by importance per millisecond saved (measured
                  per-layer table), so a MACs or params target is met where the time is. With
                  a MACs/params target the removals of that ranking, of time saved per MAC saved
                  (``"latency_per_mac"``), of importance per MAC saved (``"global"``) and of
                  uniform per-group ratios (widths rounded to 8 and 16) are each measured on
                  ``latency_runtime`` and the fastest is applied (``PruneResult.latency_candidates``).
                  None (default): under ``target_macs`` without ``global_ranking``, the same
                  ranking on the shape-based estimate (no table, no candidates measured); False:
                  each group cut alike (the behaviour before the estimate became the default).
    min_channels: never keep fewer than this many atoms in a group.
    target_params: like ``target_macs`` for the trainable parameter count.
    ratios:       ``{module glob: ratio}``: per-module ratios for the group holding that module's
                  output channels (the first matching glob wins); an integer key is a group id
                  (``DependencyGraph.groups[i].index``, as ``torchslim analyze`` lists them)
                  and addresses that group directly. One meaning either way: the most
                  that group may lose. Where every group loses ``ratio`` (per-group ranking, no
                  target) it loses its own ratio instead; under any target (MACs, params,
                  latency) and with global or latency-aware ranking the search and ranking
                  decide, and stop that group at its ratio. A glob matching no
                  module is refused, as for ``op_names`` and ``exclude``; a config under which
                  nothing can be removed (``round_to``/``min_channels`` above every group, all
                  groups excluded) prunes nothing with a ``NothingPrunedWarning`` naming the field.
    global_ranking: rank atoms across groups (scores divided by their group's mean; with a
                  target, by importance per MAC/param saved) instead of per group.
    max_sparsity_per_layer: with global ranking, the most any group may lose. None (default):
                  0.6 under the default MACs-target ranking (lifted if the target cannot be
                  met within it), else no limit.
    protect_inputs: module globs whose INPUT channels must stay (``exclude`` protects outputs).
    exact_only:   groups whose channels feed a statistic over the channel dim (LayerNorm, RMSNorm,
                  softmax, mean) are inexact: removing them is not identical to zeroing. None
                  (default) prefers exact groups: a plain ratio prunes only exact groups (an
                  ``InexactGroupsWarning`` says how many were left); a target is met with exact
                  groups if it can be, else inexact groups are added and a warning lists them.
                  True never prunes inexact groups; False treats them like any other.
    seed:         seed for the random criterion.
    verify:       compare the pruned model with the zeroed original on the example inputs and
                  roll back on mismatch (``atol`` + ``rtol`` x the output's magnitude). Left at
                  None, ``atol``/``rtol`` follow the dtype of the outputs and parameters
                  (``torchslim.pruning.verify.TOLERANCES``: float64 1e-10/1e-8, float32
                  1e-5/5e-4, float16 and TF32 1e-3/1e-2, bfloat16 1e-2/5e-2), the same
                  defaults ``verify`` uses: sums in a different order drift by a few units in
                  the last place per layer, while a wrong structure is off by far more.
                  Groups flagged inexact (LayerNorm, softmax, weight standardisation) cannot
                  match; the exact groups removed with them are still checked at tolerance.
    max_inexact_deviation: the largest relative L2 error ``|pruned - zeroed| / |zeroed|`` of
                  the outputs that removing inexact groups may cause (0.75 by default: an
                  output off by three quarters of its own size, like one collapsed towards
                  zero, has lost what it computed); beyond it ``prune_`` rolls back and raises
                  naming the groups. None accepts any deviation. Each inexact group's measured
                  deviation is in ``PruneResult.inexact_groups`` and a warning.
    """

    ratio: float = Amount.ratio
    criterion: object = Ranking.criterion
    op_names: Sequence[str] | None = Scope.op_names
    exclude: Sequence[str] = Scope.exclude
    filter_fn: ModuleFilter | None = Scope.filter_fn
    target_macs: float | None = Amount.target_macs
    round_to: int | str | None = Ranking.round_to
    min_channels: int = Amount.min_channels
    target_params: float | None = Amount.target_params
    ratios: dict[str | int, float] | None = Amount.ratios
    global_ranking: bool = Ranking.global_ranking
    max_sparsity_per_layer: float | None = Ranking.max_sparsity_per_layer
    protect_inputs: Sequence[str] = Scope.protect_inputs
    target_latency: float | None = Amount.target_latency
    latency_threads: int = LatencyOptions.latency_threads
    latency_runtime: str = LatencyOptions.latency_runtime
    latency_aware: bool | None = Ranking.latency_aware
    exact_only: bool | None = Ranking.exact_only
    seed: int = Ranking.seed
    verify: bool = Verification.verify
    atol: float | None = Verification.atol
    rtol: float | None = Verification.rtol
    max_inexact_deviation: float | None = Verification.max_inexact_deviation

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.ratio) < 1.0:
            raise ValueError(f"PruneConfig.ratio must be in [0, 1), got {self.ratio}")
        if self.round_to is not None and self.round_to != "latency" and (not isinstance(self.round_to, int)
                                                                        or self.round_to < 1):
            raise ValueError(f"PruneConfig.round_to must be an int >= 1, 'latency' or None, got {self.round_to!r}")
        if self.latency_runtime not in RUNTIMES:
            raise ValueError(f"PruneConfig.latency_runtime must be one of {', '.join(RUNTIMES)}, "
                             f"got {self.latency_runtime!r}")
        if self.target_latency is not None and not float(self.target_latency) > 0:
            raise ValueError(f"PruneConfig.target_latency must be > 0, got {self.target_latency}")
        if int(self.min_channels) < 1:
            raise ValueError(f"PruneConfig.min_channels must be >= 1, got {self.min_channels}")
        if self.target_macs is not None and not float(self.target_macs) > 0:
            raise ValueError(f"PruneConfig.target_macs must be > 0, got {self.target_macs}")
        if self.target_params is not None and not float(self.target_params) > 0:
            raise ValueError(f"PruneConfig.target_params must be > 0, got {self.target_params}")
        targets = [f for f in TARGET_FIELDS if getattr(self, f) is not None]
        if len(targets) > 1:
            raise ValueError(f"PruneConfig.{targets[0]} and PruneConfig.{targets[1]} conflict: give one target")
        if self.max_sparsity_per_layer is not None and not 0.0 < float(self.max_sparsity_per_layer) <= 1.0:
            raise ValueError(f"PruneConfig.max_sparsity_per_layer must be in (0, 1], got {self.max_sparsity_per_layer}")
        for pattern, value in (self.ratios or {}).items():
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"PruneConfig.ratios[{pattern!r}] must be in [0, 1), got {value}")
        for field in ("atol", "rtol"):
            value = getattr(self, field)
            if value is not None and not float(value) >= 0:
                raise ValueError(f"PruneConfig.{field} must be >= 0 or None (by dtype), got {value}")
        if self.max_inexact_deviation is not None and not float(self.max_inexact_deviation) > 0:
            raise ValueError(f"PruneConfig.max_inexact_deviation must be > 0 or None (any), "
                             f"got {self.max_inexact_deviation}")
        if isinstance(self.op_names, str) or isinstance(self.exclude, str) or isinstance(self.protect_inputs, str):
            raise ValueError("PruneConfig.op_names and PruneConfig.exclude take a list of glob patterns, not a string")
        if isinstance(self.criterion, str):
            from torchslim.criteria import CRITERIA

            if self.criterion not in CRITERIA:
                raise ValueError(f"PruneConfig.criterion {self.criterion!r} is unknown; choose one of {sorted(CRITERIA)}")

    @classmethod
    def from_parts(cls, *parts: Scope | Amount | Ranking | LatencyOptions | Verification, **fields) -> "PruneConfig":
        """A config from part objects (at most one of each kind), flat ``fields`` overriding them."""
        kinds = [type(part).__name__ for part in parts]
        for part in parts:
            if type(part) not in PARTS.values():
                raise TypeError(f"PruneConfig.from_parts takes Scope, Amount, Ranking, LatencyOptions and "
                                f"Verification objects, got {type(part).__name__}")
            if kinds.count(type(part).__name__) > 1:
                raise ValueError(f"PruneConfig.from_parts got two {type(part).__name__} parts")
        values = {f.name: getattr(part, f.name) for part in parts for f in dataclasses.fields(part)}
        return cls(**{**values, **fields})

    def _part(self, kind: type):
        return kind(**{f.name: getattr(self, f.name) for f in dataclasses.fields(kind)})

    @property
    def scope(self) -> Scope:
        return self._part(Scope)

    @property
    def amount(self) -> Amount:
        return self._part(Amount)

    @property
    def ranking(self) -> Ranking:
        return self._part(Ranking)

    @property
    def latency(self) -> LatencyOptions:
        return self._part(LatencyOptions)

    @property
    def verification(self) -> Verification:
        return self._part(Verification)

    @property
    def target(self) -> Target | None:
        """The one target set (MACs, params or latency), or None when ``ratio`` applies."""
        for field in TARGET_FIELDS:
            value = getattr(self, field)
            if value is not None:
                return Target(field, float(value))
        return None

    @property
    def needs_latency(self) -> bool:
        return self.target_latency is not None or self.round_to == "latency" or bool(self.latency_aware)
