"""Seeded random scores: a baseline, and a way to test the engine on arbitrary choices."""
from __future__ import annotations

import numpy as np

from torchslim.graph import DependencyGraph, Group


class RandomImportance:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def __call__(self, graph: DependencyGraph, group: Group) -> np.ndarray:
        return self.rng.random(len(group))
