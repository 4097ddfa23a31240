"""Closing the loop on ``target_latency``: measure, then correct the table's prediction.

The per-layer table predicts how much time a removal saves, but a runtime that fuses or
re-lays-out layers (ONNX Runtime's conv + BN + activation, NCHWc reorders) saves more or
less than the sum of layers measured alone. So the removal the table picks is built on
the side, measured on the target runtime, and the goal handed to the table is rescaled by
the ratio of real to predicted savings, a few times (NetAdapt measures every proposal too).
"""
from __future__ import annotations

import numpy as np

from torchslim.latency import measure_model
from torchslim.pruning._select import TARGET_SEARCH_MAX_RATIO
from torchslim.pruning._surgery import Transaction, apply_removal

ROUNDS = 3
TOLERANCE = 0.03  # stop once the measured latency is within 3% of the target


def calibrate_latency_goal(selector, graph, example_inputs, config, banned: np.ndarray) -> list[dict]:
    """Adjust ``selector.latency_goal_ms`` until the measured latency of its removal meets the
    target; returns what each round predicted and measured (kept in ``PruneResult``)."""
    latency = selector.latency
    original, target = latency.measured_ms, selector.absolute_target()
    history = []
    for round_ in range(ROUNDS):
        _, removed = selector.select(banned)
        if removed.size == 0:
            break
        predicted = latency.predict(removed)
        measured = _measure_removed(graph, removed, example_inputs, config)
        history.append({"goal_ms": selector.latency_goal_ms or target, "predicted_ms": predicted,
                        "measured_ms": measured})
        if measured is None or abs(measured - target) <= TOLERANCE * target or round_ == ROUNDS - 1:
            break  # the last goal is the one measured
        saved_predicted, saved_measured = original - predicted, original - measured
        if saved_predicted <= 0 or saved_measured <= 0:
            break
        goal = original - (original - target) * saved_predicted / saved_measured
        lowest = latency.predict(selector.remove_at(TARGET_SEARCH_MAX_RATIO, banned))  # the most this config allows
        selector.latency_goal_ms = float(np.clip(goal, lowest, original))
    return history


def _measure_removed(graph, removed, example_inputs, config) -> float | None:
    """Latency of the model with ``removed`` applied (then rolled back); None if it fails."""
    tx = Transaction()
    try:
        apply_removal(graph, removed, tx)
        return measure_model(graph.model, example_inputs, runtime=config.latency_runtime,
                             threads=config.latency_threads, warmup=3, repeats=15).median_ms
    except Exception:  # noqa: BLE001 - a removal that breaks the model is the retry loop's business
        return None
    finally:
        tx.rollback()
