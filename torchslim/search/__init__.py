"""Automatic searches that decide what to prune by measuring the model while they decide.

One loop (:class:`~torchslim.search.base.Search`) proposes per-group ratios, scales each
candidate to meet the budget exactly, prunes it on the side (apply + rollback on one traced
graph), optionally fine-tunes a copy, evaluates and appends the record to a resumable history;
the methods built on it: :class:`SensitivitySearch` (each group pruned alone at 0.1..0.9, then
the least predicted loss meeting the budget; the analysis re-searches a new budget without
evaluating), :class:`NetAdaptSearch` (Yang et al. 2018: scheduled cuts, one proposal per group,
the best kept) and :class:`AnnealingSearch` (simulated annealing, as NNI's pruner). The result
is an ordinary ``PruneConfig`` with per-group ratios by group id. Candidates proposed together
(sensitivity probes, one NetAdapt iteration) are scored by an executor: in process by default,
or in parallel on Ray (:class:`RayExecutor`), with the same history either way.

``torchslim.search.latency_loop`` closes the loop on latency for ``prune_``: a latency
target's goal is calibrated against measured removals, and under ``latency_aware`` the
candidate rankings are timed and the fastest kept (NetAdapt's lesson: measure every proposal).
:class:`ADMMPruner` (ADMM structured pruning inside the user's training loop, AutoCompress's
inner loop) projects onto the group-sparse set the same selector chooses; :class:`AutoCompress`
runs rounds of annealing then ADMM training; :class:`AMCSearch` (He et al. 2018) trains a DDPG
agent whose per-group actions are clipped to keep the budget reachable. The searches drive
the engine only through its public API (``torchslim.pruning``: the
:class:`~torchslim.pruning.selector.Selector`, ``plan_removal`` and ``applied``).

Names are imported lazily: ``torchslim.pruning`` imports ``latency_loop`` from this package.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Search": "torchslim.search.base",
    "SearchResult": "torchslim.search.base",
    "SearchInterrupted": "torchslim.search.base",
    "SearchWarning": "torchslim.search.base",
    "Record": "torchslim.search.history",
    "read_history": "torchslim.search.history",
    "SensitivitySearch": "torchslim.search.sensitivity",
    "SensitivityAnalysis": "torchslim.search.sensitivity",
    "AnnealingSearch": "torchslim.search.annealing",
    "NetAdaptSearch": "torchslim.search.netadapt",
    "Executor": "torchslim.search.executors",
    "InProcess": "torchslim.search.executors",
    "RayExecutor": "torchslim.search.executors",
    "ADMMPruner": "torchslim.search.admm",
    "ADMMState": "torchslim.search.admm",
    "AMCSearch": "torchslim.search.amc",
    "DDPGConfig": "torchslim.search._ddpg",
    "AutoCompress": "torchslim.search.autocompress",
    "AutoCompressResult": "torchslim.search.autocompress",
    "admm_trainer": "torchslim.search.autocompress",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchslim.search' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
