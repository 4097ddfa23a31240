"""A pruning plan: which indices of which parameters and buffers were removed.

Plans are plain JSON (parameter name -> dim -> removed indices, plus the original
shapes), so a pruned checkpoint can be re-created from a freshly built original
without unpickling anything. Successive prunings are kept as ordered steps.

A step may also record module replacements (structural rewrites: a block replaced by
``nn.Identity``, a conv and its BatchNorm folded into one conv), ``replaced``: module path ->
``{"type": <allow-listed type name>, "init": <JSON-plain constructor kwargs>}``, applied before
the step's removals (see :func:`torchslim.pruning.replace_module_`). Plans without
replacements are written as format ``torchslim.plan/1``, as before; with one, as
``torchslim.plan/2`` (an older reader refuses it rather than ignore the rewrite). Both are read.

A step may also drop whole blocks (depth pruning), ``dropped``: the paths of entries of
``nn.ModuleList`` / ``nn.Sequential`` containers (names before the step), removed before its
replacements and removals; the container's later entries are renumbered, so the names of their
tensors change (``layers.5.mlp.weight`` becomes ``layers.4.mlp.weight`` after ``layers.2`` goes).
Everything a plan names after a drop step uses the names after it (see :func:`name_after_drops`).
A step that removes whole experts of mixture-of-experts layers (:func:`torchslim.pruning.prune_experts_`)
also records them in ``experts`` (layer path -> expert indices removed, of the layer before the
step); per-expert modules in an ``nn.ModuleList`` go as dropped entries. Plans with either are
written as ``torchslim.plan/3``.

A model pruned by ``prune_`` (or re-created by ``load``) carries its history, the plan of
every pruning since it was built, as a plain attribute of its root module (read it with
:func:`pruning_history`): it survives ``copy.deepcopy``, stays out of ``state_dict()`` and
lets ``save(model, path)`` write a checkpoint without being handed the plan.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclasses.dataclass
class PlanStep:
    removed: dict[str, dict[int, list[int]]]  # name -> dim -> removed indices (of the shape before this step)
    shapes: dict[str, list[int]]  # name -> shape before this step
    attributes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # module -> attr -> new value
    # module path -> {"type": allow-listed type name, "init": JSON-plain kwargs}; before the removals
    replaced: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # index buffers among ``removed`` (permutations that pick channels): after slicing, their
    # values are renumbered to count the kept channels only
    renumbered: list[str] = dataclasses.field(default_factory=list)
    # entries of ModuleList / Sequential containers removed whole (depth pruning), before the rest
    dropped: list[str] = dataclasses.field(default_factory=list)
    # mixture-of-experts layer path -> experts removed (what the step did, for readers and verify)
    experts: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def kept(self, name: str, dim: int) -> np.ndarray:
        size = self.shapes[name][dim]
        return np.setdiff1d(np.arange(size), np.asarray(self.removed.get(name, {}).get(dim, []), dtype=np.int64))


@dataclasses.dataclass
class PruningPlan:
    steps: list[PlanStep] = dataclasses.field(default_factory=list)

    @property
    def removed(self) -> dict[str, dict[int, list[int]]]:
        """Removed indices relative to the original (unpruned) shapes, all steps composed."""
        if not self.steps:
            return {}
        composed: dict[str, dict[int, np.ndarray]] = {}
        current: dict[tuple[str, int], np.ndarray] = {}  # original index of each surviving index
        for step in self.steps:
            if step.dropped:  # the names move with their renumbered containers; dropped tensors go
                composed = _renamed(composed, step.dropped)
                current = {(new, dim): v for (name, dim), v in current.items()
                           if (new := name_after_drops(name, step.dropped)) is not None}
            for path in step.replaced:  # a replaced module's tensors are new: they start unpruned
                composed = {n: d for n, d in composed.items() if not under(n, path)}
                current = {k: v for k, v in current.items() if not under(k[0], path)}
            for name, dims in step.removed.items():
                for dim, gone in dims.items():
                    key = (name, dim)
                    # an index never pruned before still has its original position
                    survivors = current[key] if key in current else np.arange(step.shapes[name][dim])
                    gone_a = np.asarray(gone, dtype=np.int64)
                    composed.setdefault(name, {})[dim] = np.union1d(composed.get(name, {}).get(dim, []), survivors[gone_a])
                    current[key] = np.delete(survivors, gone_a)
        return {n: {d: [int(i) for i in idx] for d, idx in dims.items()} for n, dims in composed.items()}

    @property
    def dropped(self) -> list[str]:
        """The blocks every step dropped, named as in the original model, in the order dropped
        (a block inside one dropped later is left out: it went with it)."""
        gone: list[str] = []
        for i, step in enumerate(self.steps):
            for path in step.dropped:
                for earlier in reversed(self.steps[:i]):
                    path = name_before_drops(path, earlier.dropped)
                gone.append(path)
        return [path for path in gone if not any(path.startswith(outer + ".") for outer in gone)]

    def name_at_end(self, name: str, step: int) -> str | None:
        """What the tensor that step ``step`` (0-based) calls ``name`` is called after the last
        step (blocks dropped later renumber it); None if it went with a dropped block."""
        current: str | None = name
        for later in self.steps[step + 1:]:
            current = name_after_drops(current, later.dropped) if current is not None else None
        return current

    @property
    def renumbered(self) -> set[str]:
        """The index buffers some step slices and renumbers (not channels of the model's function)."""
        return {name for step in self.steps for name in step.renumbered}

    @property
    def num_removed(self) -> int:
        return sum(len(v) for dims in self.removed.values() for v in dims.values())

    def __bool__(self) -> bool:
        return any(step.removed or step.replaced or step.dropped for step in self.steps)

    def extend(self, other: "PruningPlan") -> "PruningPlan":
        return PruningPlan(self.steps + other.steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: format ``torchslim.plan/1``, ``/2`` when a step replaces modules or
        renumbers index buffers, ``/3`` when one drops blocks or removes experts."""
        steps = []
        for s in self.steps:
            step: dict[str, Any] = {
                "removed": {n: {str(d): list(map(int, idx)) for d, idx in dims.items()} for n, dims in s.removed.items()},
                "shapes": {n: list(map(int, shape)) for n, shape in s.shapes.items()},
                "attributes": s.attributes,
            }
            if s.replaced:
                step["replaced"] = {path: {"type": spec["type"], "init": spec["init"]} for path, spec in s.replaced.items()}
            if s.renumbered:
                step["renumbered"] = list(s.renumbered)
            if s.dropped:
                step["dropped"] = list(s.dropped)
            if s.experts:
                step["experts"] = {path: list(map(int, idx)) for path, idx in s.experts.items()}
            steps.append(step)
        newer = any(s.replaced or s.renumbered for s in self.steps)
        version = 2 if any(s.dropped or s.experts for s in self.steps) else 1 if newer else 0
        return {"format": PLAN_FORMATS[version], "steps": steps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningPlan":
        if not isinstance(data, dict) or data.get("format") not in PLAN_FORMATS:
            raise ValueError(f"not a torchslim pruning plan (format is not one of {', '.join(PLAN_FORMATS)})")
        steps = []
        for s in data["steps"]:
            removed = {n: {int(d): [int(i) for i in idx] for d, idx in dims.items()} for n, dims in s["removed"].items()}
            shapes = {n: [int(x) for x in shape] for n, shape in s["shapes"].items()}
            replaced = {path: {"type": spec["type"], "init": dict(spec["init"])} for path, spec in s.get("replaced", {}).items()}
            steps.append(PlanStep(removed, shapes, dict(s.get("attributes", {})), replaced,
                                  [str(name) for name in s.get("renumbered", [])],
                                  [str(path) for path in s.get("dropped", [])],
                                  {str(p): [int(i) for i in idx] for p, idx in s.get("experts", {}).items()}))
        return cls(steps)


# written: /1 without replacements or renumbering, /2 with, /3 when a step drops blocks or experts
PLAN_FORMATS = ("torchslim.plan/1", "torchslim.plan/2", "torchslim.plan/3")


def under(name: str, path: str) -> bool:
    """Whether the tensor or module ``name`` lies inside the module at ``path`` (or is it)."""
    return name == path or name.startswith(path + ".")


def _entry_drops(dropped: list[str]) -> list[tuple[str, set[int]]]:
    """The dropped entries grouped by container path: ``[(container, {index, ...})]``."""
    by_container: dict[str, set[int]] = {}
    for path in dropped:
        container, _, index = path.rpartition(".")
        by_container.setdefault(container, set()).add(int(index))
    return list(by_container.items())


def _split_at(name: str, container: str) -> tuple[int, str] | None:
    """``name`` under ``container.<index>``: (index, the rest with its leading dot); else None."""
    prefix = container + "." if container else ""
    if not name.startswith(prefix):
        return None
    head, dot, rest = name[len(prefix):].partition(".")
    return (int(head), dot + rest) if head.isascii() and head.isdigit() else None


def name_after_drops(name: str, dropped: list[str]) -> str | None:
    """What a tensor or module called ``name`` is called once the entries ``dropped`` (paths of
    container entries, as one step records them) are gone; None if it went with them."""
    for container, gone in sorted(_entry_drops(dropped), key=lambda c: -c[0].count(".") - bool(c[0])):
        at = _split_at(name, container)
        if at is None:
            continue
        index, rest = at
        if index in gone:
            return None
        prefix = container + "." if container else ""
        name = f"{prefix}{index - sum(g < index for g in gone)}{rest}"
    return name


def name_before_drops(name: str, dropped: list[str]) -> str:
    """The inverse of :func:`name_after_drops`: the name a surviving ``name`` had before."""
    for container, gone in sorted(_entry_drops(dropped), key=lambda c: c[0].count(".") + bool(c[0])):
        at = _split_at(name, container)
        if at is None:
            continue
        index, rest = at
        before = next(i for i in range(index + len(gone) + 1) if i not in gone and
                      i - sum(g < i for g in gone) == index)
        prefix = container + "." if container else ""
        name = f"{prefix}{before}{rest}"
    return name


def _renamed(composed: dict[str, Any], dropped: list[str]) -> dict[str, Any]:
    return {new: v for name, v in composed.items() if (new := name_after_drops(name, dropped)) is not None}


# pruning history ------------------------------------------------------------------------
HISTORY_ATTRIBUTE = "_torchslim_history"


@dataclasses.dataclass
class PruningHistory:
    """What a model went through: ``plan`` (every pruning since the original was built) and
    ``shapes``, its state_dict shapes right after. ``conflict`` says why the plan stopped
    describing the model (its shapes changed by hand between two prunings), when that happened."""

    plan: PruningPlan
    shapes: dict[str, tuple[int, ...]]
    conflict: str | None = None


def pruning_history(model: nn.Module) -> PruningPlan:
    """The plan of every pruning applied to ``model`` since it was built (``prune_`` calls
    accumulate; ``load`` starts it with the checkpoint's plan); empty when never pruned."""
    history = recorded_history(model)
    return PruningPlan(list(history.plan.steps)) if history is not None else PruningPlan()


def recorded_history(model: nn.Module) -> PruningHistory | None:
    history = getattr(model, HISTORY_ATTRIBUTE, None)
    return history if isinstance(history, PruningHistory) else None


def record_history(model: nn.Module, plan: PruningPlan, *, start_over: bool = False,
                   shapes_before: dict[str, tuple[int, ...]] | None = None) -> None:
    """Append ``plan`` (just applied to ``model``) to its history, or start the history with it.

    Appending first checks that the model, before ``plan``, still had the shapes the history
    left it with; if not (pruned by hand in between), the history keeps the plan but records
    the conflict, so that ``save`` refuses it rather than write a checkpoint ``load`` rejects.
    ``shapes_before``: the model's state_dict shapes before ``plan`` when the plan cannot tell
    them (a module replacement changes the state_dict keys).
    """
    previous = None if start_over else recorded_history(model)
    conflict = previous.conflict if previous is not None else None
    if previous is not None and conflict is None:
        found = shape_conflict(previous.shapes, shapes_before if shapes_before is not None else _shapes_before(model, plan))
        conflict = f"before pruning step {len(previous.plan.steps) + 1}, {found}" if found else None
    steps = (list(previous.plan.steps) if previous is not None else []) + list(plan.steps)
    setattr(model, HISTORY_ATTRIBUTE, PruningHistory(PruningPlan(steps), state_shapes(model), conflict))


def history_mismatch(model: nn.Module) -> str | None:
    """Why ``model``'s current shapes disagree with its recorded history, or None when they agree."""
    history = recorded_history(model)
    if history is None:
        return None
    return history.conflict or shape_conflict(history.shapes, state_shapes(model))


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in ``model.state_dict()``: what a checkpoint stores."""
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


def shape_conflict(recorded: dict[str, tuple[int, ...]], actual: dict[str, tuple[int, ...]]) -> str | None:
    """The first state_dict entry whose shape differs between the two, described; None if none."""
    for key in list(recorded) + [k for k in actual if k not in recorded]:
        if key not in actual:
            return f"'{key}' (shape {list(recorded[key])} after its last pruning) is no longer in the model"
        if key not in recorded:
            return f"'{key}' (shape {list(actual[key])}) was added after its last pruning"
        if recorded[key] != actual[key]:
            return f"'{key}' has shape {list(actual[key])}, its last pruning left it at {list(recorded[key])}"
    return None


def _shapes_before(model: nn.Module, plan: PruningPlan) -> dict[str, tuple[int, ...]]:
    """``model``'s state_dict shapes before ``plan`` was applied: the current shapes, with each
    tensor the plan sliced put back to the shape its first step found (tied names alike)."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    before: dict[int, tuple[int, ...]] = {}
    for step in reversed(plan.steps):
        for name, shape in step.shapes.items():
            if name in tensors:
                before[id(tensors[name])] = tuple(shape)
    return {k: before.get(id(v), tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor)}
