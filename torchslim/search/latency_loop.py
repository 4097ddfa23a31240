"""Closing the loop on latency: proposals are built on the side and measured, not trusted.

The per-layer table predicts how much time a removal saves, but a runtime that fuses or
re-lays-out layers (ONNX Runtime's conv + BN + activation, NCHWc reorders) saves more or
less than the sum of layers measured alone (NetAdapt measures every proposal too). So:

* ``target_latency``: the removal the table picks is measured on the target runtime (in turn
  with the unpruned model, so both see the same machine state) and the goal handed to the
  table is rescaled by the ratio of real to predicted savings, a few times; where the table's
  proposals jump over the target (all groups stepping to their next width together), removals
  in between (some groups stepped, others not) are measured too;
* ``latency_aware`` with a MACs/params target: the removal of each candidate ranking (the
  table's, time saved per MAC saved, importance per MAC saved, and every group cut alike at
  multiples of 8 and 16) meets the same target (one that removes more than 2% of the original
  beyond the config's own ranking is dropped: faster only because it removed more), and the
  one that measures fastest is kept. Which wins depends on the model
  and the runtime (time per MAC on ResNet-50 and MODNet, uniform widths on MobileNetV2 in
  ONNX Runtime); measuring settles it per model.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from torchslim._timing import measure_latency
from torchslim.latency import best_of_rounds, make_runner
from torchslim.modes import training_mode
from torchslim.pruning.selector import TARGET_SEARCH_MAX_RATIO, Selector
from torchslim.pruning.apply import applied, plan_removal

ROUNDS = 4
TOLERANCE = 0.03  # stop once the measured latency is within 3% of the target
CALIBRATION_ROUNDS = 3
MIN_SECONDS = 0.25  # per measurement: a 2 ms model is timed over ~125 calls, not 10


def calibrate_latency_goal(selector: Selector, graph, example_inputs, config,
                           banned: np.ndarray) -> tuple[Selector, list[dict]]:
    """Adjust the latency goal handed to ``selector`` until the measured latency of its removal
    meets the target (at most ``ROUNDS`` rounds), then keep the removal that measured closest; if
    no proposal came within tolerance, measure removals between the two around the target.
    Returns the selector choosing that removal (the one given is not changed) and what each round
    predicted and measured (kept in ``PruneResult``)."""
    latency = selector.latency
    original, target = latency.measured_ms, selector.absolute_target()
    unpruned = removal_timer(graph, np.zeros(0, dtype=np.int64), example_inputs, config)
    history, removals = [], []
    for round_ in range(ROUNDS):
        ratio, removed = selector.select(banned)
        if removed.size == 0:
            break
        predicted = latency.predict(removed)
        measured = _measured_against(unpruned, removal_timer(graph, removed, example_inputs, config), original)
        history.append({"goal_ms": selector.latency_goal_ms, "predicted_ms": predicted, "measured_ms": measured})
        removals.append((ratio, removed))
        if measured is None or abs(measured - target) <= TOLERANCE * target or round_ == ROUNDS - 1:
            break
        points = [(original, original)] + [(h["predicted_ms"], h["measured_ms"]) for h in history]
        goal = next_goal(points, target)
        lowest = latency.predict(selector.remove_at(TARGET_SEARCH_MAX_RATIO, banned))  # the most this config allows
        selector = selector.choosing(latency_goal_ms=float(np.clip(goal, lowest, original)))
    # on a noisy machine a later round can measure worse than an earlier one: keep the removal
    # that measured closest to the target
    best = _closest(history, target)
    for entry in history:
        entry["goal_ms"] = entry["goal_ms"] if entry["goal_ms"] is not None else target
    if best is not None and abs(history[best]["measured_ms"] - target) > TOLERANCE * target:
        _between_proposals(selector, graph, example_inputs, config, history, removals, unpruned, target)
        best = _closest(history, target)  # a removal in between wins only if strictly closer
    if best is not None:  # that very removal, not a re-selection at its goal (which the table's
        # later re-timed entries could change)
        selector = selector.choosing(measured_choice=removals[best])
    for index, (entry, (_, removed)) in enumerate(zip(history, removals)):
        entry["chosen"] = index == best
        # the table re-times entries a later lookup disagreed with: every prediction is restated
        # with the table as it ends, the one the applied removal's prediction uses too
        entry["predicted_ms"] = latency.predict(removed)
    return selector, history


def _closest(history: list[dict], target: float) -> int | None:
    """Index of the first measured entry closest to ``target``; None if none was measured."""
    measured = [i for i, h in enumerate(history) if h["measured_ms"] is not None]
    return min(measured, key=lambda i: abs(history[i]["measured_ms"] - target), default=None)


BETWEEN_ROUNDS = 3


def _between_proposals(selector, graph, example_inputs, config, history, removals, unpruned, target) -> None:
    """When the table's proposals jump over the target (every group steps to its next width at
    the same goal, e.g. a ViT head in all twelve blocks at once), bisect over the groups taking
    that step: the removal measured just above the target plus the step of the first k groups.
    Appends each measured removal to ``history`` and its (ratio, atoms) to ``removals`` (the
    caller picks the closest with :func:`_closest`); nothing without two proposals around the
    target."""
    measured = [(h, r) for h, r in zip(history, removals) if h["measured_ms"] is not None]
    original = selector.latency.measured_ms  # the unpruned model bounds the target from above
    measured.append(({"predicted_ms": original, "measured_ms": original}, (0.0, np.zeros(0, dtype=np.int64))))
    above = [(h, r) for h, r in measured if h["measured_ms"] > target]
    below = [(h, r) for h, r in measured if h["measured_ms"] <= target]
    if not above or not below:
        return
    (high, (_, fewer)), (low, (ratio, more)) = min(above, key=lambda x: x[0]["measured_ms"]), \
        max(below, key=lambda x: x[0]["measured_ms"])
    step = np.setdiff1d(more, fewer)
    owners = graph.atom_group[step]
    groups = [g for g in np.unique(owners) if g >= 0]
    if len(groups) < 2 or not np.isin(fewer, more).all():
        return
    # the groups whose step saves the most predicted time first, so that k moves latency steadily
    saving = {g: -selector.latency.predict(np.concatenate([fewer, step[owners == g]])) for g in groups}
    groups.sort(key=lambda g: -saving[g])
    lo, hi = 0, len(groups)
    for _ in range(BETWEEN_ROUNDS):
        if hi - lo < 2:
            break
        k = (lo + hi) // 2
        removed = np.concatenate([fewer, step[np.isin(owners, groups[:k])]])
        ms = _measured_against(unpruned, removal_timer(graph, removed, example_inputs, config), original)
        if ms is None:
            break
        entry = {"goal_ms": None, "predicted_ms": selector.latency.predict(removed), "measured_ms": ms,
                 "between": [high["predicted_ms"], low["predicted_ms"]], "groups_stepped": k}
        history.append(entry)
        removals.append((ratio, removed))
        lo, hi = (lo, k) if ms <= target else (k, hi)


def next_goal(points: list[tuple[float, float]], target: float) -> float:
    """The predicted latency whose measurement should be ``target``, by linear interpolation
    over (predicted, measured) points (the unpruned model is (original, original)): between
    the closest measured above and below the target, or through the two lowest when none is
    below yet. Regula falsi, so that a runtime whose savings differ from the table's at
    different depths (ONNX Runtime) converges instead of oscillating."""
    above = [p for p in points if p[1] > target]
    below = [p for p in points if p[1] <= target]
    if above and below:
        a, b = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
    else:
        a, b = sorted(points, key=lambda p: p[1])[:2]
    if b[1] == a[1]:
        return a[0]
    return a[0] + (target - a[1]) * (b[0] - a[0]) / (b[1] - a[1])


# (ranking, round_to) tried besides the config's own when latency_aware meets a MACs/params target:
# time saved per MAC saved, importance per MAC saved (both across groups), every group cut alike
OTHER_CANDIDATES = (("latency_per_mac", "latency"), ("global", 8), ("per_group", 8), ("per_group", 16))
CLEARLY_FASTER = 0.02
MAX_OVERSHOOT = 0.02  # a candidate may remove at most 2% of the original more than the config's own ranking
CANDIDATE_ROUNDS = 3


def choose_fastest_ranking(selector: Selector, graph, example_inputs, config,
                           banned: np.ndarray) -> tuple[Selector, list[dict]]:
    """The selector set to the candidate ranking whose removal measures fastest on the target
    runtime (the one given is not changed), and each candidate's measured latency (kept in
    ``PruneResult``)."""
    candidates = [(selector.ranking, selector.round_to)] + [c for c in OTHER_CANDIDATES
                                                          if c != (selector.ranking, selector.round_to)]
    _, _, measure, before = selector.measure_for_target()
    trials: list[dict[str, Any]] = []
    timers: dict[int, Callable[[], float]] = {}
    for ranking, round_to in candidates:
        try:
            _, removed = selector.choosing(ranking=ranking, round_to=round_to).select(banned)
        except ValueError:  # this ranking cannot meet the target (e.g. min_channels): not a candidate
            continue
        left = measure(graph, removed)
        if trials and left < trials[0]["target_fraction"] * before - MAX_OVERSHOOT * before:
            continue  # coarse widths removed more than the config's own (ViT's 64 head dims in steps of 16)
        trial = {"ranking": ranking, "round_to": round_to, "measured_ms": None, "target_fraction": left / before}
        trials.append(trial)
        timer = removal_timer(graph, removed, example_inputs, config) if removed.size else None
        if timer is not None:
            timers[len(trials) - 1] = timer
    for index, ms in best_of_rounds(timers, rounds=CANDIDATE_ROUNDS).items():
        trials[index]["measured_ms"] = ms if np.isfinite(ms) else None
    best: dict[str, Any] = {"ranking": candidates[0][0], "round_to": candidates[0][1], "measured_ms": None}
    for trial in trials:  # the config's own ranking wins unless another is clearly faster
        if trial["measured_ms"] is not None and (best["measured_ms"] is None or
                                                 trial["measured_ms"] < best["measured_ms"] * (1 - CLEARLY_FASTER)):
            best = trial
    for trial in trials:
        trial["chosen"] = trial is best
    return selector.choosing(ranking=best["ranking"], round_to=best["round_to"]), trials


def removal_timer(graph, removed, example_inputs, config):
    """A function returning, per call, one median latency of the model with ``removed`` applied
    (the model itself is restored after each call); None if the removal breaks the model.

    Eager PyTorch applies and rolls back around every measurement (no copy of the model is
    kept); ONNX Runtime exports the pruned model once and times its session."""
    threads = config.latency_threads
    if config.latency_runtime == "torch":
        try:
            plan = plan_removal(graph, removed)  # planned once, applied and rolled back per measurement
        except Exception:  # noqa: BLE001 - a removal that breaks the model is the retry loop's business
            return lambda: float("inf")

        def measure() -> float:
            try:
                with applied(graph, plan), training_mode(graph.model, False):
                    run = make_runner(graph.model, example_inputs, "torch", threads)
                    return measure_latency(run, warmup=3, repeats=10, threads=threads, min_seconds=MIN_SECONDS).median_ms
            except Exception:  # noqa: BLE001 - a removal that breaks the model is the retry loop's business
                return float("inf")
        return measure
    try:
        with applied(graph, removed):
            run = make_runner(graph.model, example_inputs, config.latency_runtime, threads)
    except Exception:  # noqa: BLE001 - as above
        return None
    return lambda: measure_latency(run, warmup=3, repeats=10, threads=threads, min_seconds=MIN_SECONDS).median_ms


def _measured_against(unpruned, proposal, original_ms: float) -> float | None:
    """The proposal's latency in the table's milliseconds: timed in turn with the unpruned model
    (min of medians over rounds) and scaled by the ratio, so a cold first measurement or load
    from other processes does not pass for a saving; None if the proposal breaks the model."""
    if unpruned is None or proposal is None:
        return None
    times = best_of_rounds({"unpruned": unpruned, "proposal": proposal}, rounds=CALIBRATION_ROUNDS)
    if not np.isfinite(times["proposal"]) or not times["unpruned"] > 0:
        return None
    return original_ms * times["proposal"] / times["unpruned"]
