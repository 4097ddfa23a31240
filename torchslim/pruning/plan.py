"""A pruning plan: which indices of which parameters and buffers were removed.

Plans are plain JSON (parameter name -> dim -> removed indices, plus the original
shapes), so a pruned checkpoint can be re-created from a freshly built original
without unpickling anything. Successive prunings are kept as ordered steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class PlanStep:
    removed: dict[str, dict[int, list[int]]]  # name -> dim -> removed indices (of the shape before this step)
    shapes: dict[str, list[int]]  # name -> shape before this step
    attributes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # module -> attr -> new value

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
    def num_removed(self) -> int:
        return sum(len(v) for dims in self.removed.values() for v in dims.values())

    def __bool__(self) -> bool:
        return any(step.removed for step in self.steps)

    def extend(self, other: "PruningPlan") -> "PruningPlan":
        return PruningPlan(self.steps + other.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "torchslim.plan/1",
            "steps": [
                {
                    "removed": {n: {str(d): list(map(int, idx)) for d, idx in dims.items()} for n, dims in s.removed.items()},
                    "shapes": {n: list(map(int, shape)) for n, shape in s.shapes.items()},
                    "attributes": s.attributes,
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningPlan":
        if not isinstance(data, dict) or data.get("format") != "torchslim.plan/1":
            raise ValueError("not a torchslim pruning plan (missing format 'torchslim.plan/1')")
        steps = []
        for s in data["steps"]:
            removed = {n: {int(d): [int(i) for i in idx] for d, idx in dims.items()} for n, dims in s["removed"].items()}
            shapes = {n: [int(x) for x in shape] for n, shape in s["shapes"].items()}
            steps.append(PlanStep(removed, shapes, dict(s.get("attributes", {}))))
        return cls(steps)
