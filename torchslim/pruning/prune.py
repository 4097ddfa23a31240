"""``prune_``: one call that ranks, removes and verifies, in place and all-or-nothing."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.graph import DependencyGraph, Group
from torchslim.graph.dependency import sorted_unique
from torchslim.graph.macs import estimate_macs
from torchslim.pruning._hf_config import sync_hf_config
from torchslim.pruning._latency_loop import calibrate_latency_goal, choose_fastest_ranking
from torchslim.pruning._select import PruningError, Selector, eligible_groups, warn_nothing_pruned
from torchslim.pruning._surgery import Transaction, apply_removal, named_tensors
from torchslim.pruning.config import PruneConfig
from torchslim.criteria import make_importance
from torchslim.pruning.plan import PlanStep, PruningPlan
from torchslim.pruning.verify import Run, compare_runs, run_eval, run_recorded, zero_removed_

MAX_ATTEMPTS = 12


@dataclasses.dataclass
class PruneResult:
    plan: PruningPlan
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    ratio: float
    groups_pruned: int
    max_abs_error: float | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)
    latency_before_ms: float | None = None  # measured, when the config used the latency model
    latency_predicted_ms: float | None = None
    # Hugging Face models: the model.config fields updated to the pruned widths (so that
    # save_pretrained/from_pretrained round-trip); None when no uniform config describes them
    hf_config: dict[str, int] | None = None
    # target_latency: per round, the goal handed to the latency table, its prediction and the
    # measured latency of that removal; the round marked "chosen" (measured closest to the
    # target) is the goal the pruned model was selected with
    latency_calibration: list[dict] = dataclasses.field(default_factory=list)
    # latency_aware with a MACs/params target: each candidate ranking's measured latency at that
    # target, and which one was kept (the fastest)
    latency_candidates: list[dict] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "plan"}


def prune_(model: nn.Module, example_inputs: ExampleInputs, config: PruneConfig | None = None, *,
           data: Any = None, loss_fn: Any = None) -> PruneResult:
    """Structurally prune ``model`` in place and return what was removed.

    Channels, heads and hidden units are ranked per group by ``config.criterion`` and the
    lowest ``config.ratio`` of each group (or as much as a ``target_macs`` needs) is
    physically removed. The result is checked against the zeroed original on
    ``example_inputs``; on any error the model is left exactly as it was. Data-driven
    criteria (taylor, apoz, mean_activation) measure on ``data`` (an iterable of batches, each
    an input or an ``(input, target)`` pair); taylor also needs ``loss_fn(output, batch)``.
    """
    config = config or PruneConfig()
    graph = DependencyGraph.build(model, example_inputs)
    groups = eligible_groups(graph, config)
    importance = make_importance(config.criterion, config.seed)
    if hasattr(importance, "prepare"):
        importance.prepare(graph, data, loss_fn)
    latency = None
    if config.needs_latency:
        from torchslim.latency import LatencyModel, LatencyTable

        latency = LatencyModel(graph, example_inputs, LatencyTable(config.latency_runtime, config.latency_threads))
    scores = {g.index: np.asarray(importance(graph, g), dtype=np.float64) for g in groups}
    selector = Selector(graph, groups, scores, config, latency)
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = selector.macs_before
    banned = np.zeros(graph.n_atoms, dtype=bool)
    skipped: list[str] = []
    calibration = calibrate_latency_goal(selector, graph, example_inputs, config, banned) \
        if config.target_latency is not None else []
    candidates = choose_fastest_ranking(selector, graph, example_inputs, config, banned) \
        if config.latency_aware and (config.target_macs is not None or config.target_params is not None) else []
    for _ in range(MAX_ATTEMPTS):
        ratio, removed = selector.select(banned)
        if removed.size == 0:
            warn_nothing_pruned(selector, banned)
            return PruneResult(PruningPlan(), macs_before, macs_before, params_before, params_before, ratio, 0,
                               skipped=skipped)
        outcome = _try_apply(model, graph, removed, example_inputs, config, groups)
        if isinstance(outcome, PruneResult):
            outcome.macs_before, outcome.params_before, outcome.ratio = macs_before, params_before, ratio
            outcome.macs_after = estimate_macs(graph, removed)
            if latency is not None:
                outcome.latency_before_ms = latency.measured_ms
                outcome.latency_predicted_ms = latency.predict(removed)
                outcome.latency_calibration = calibration
                outcome.latency_candidates = candidates
            outcome.skipped = skipped
            outcome.hf_config = sync_hf_config(model)
            return outcome
        culprits, reason = outcome
        if culprits.size == 0 or banned[culprits].all():
            # nothing points at an op (e.g. a size read in Python built an output): bisect the groups
            culprits = _bisect_failing_group(model, graph, removed, example_inputs, config, groups)
        if culprits.size == 0 or banned[culprits].all():
            raise PruningError(f"pruning failed and was rolled back: {reason}. To proceed: exclude the module "
                               "named here (PruneConfig.exclude) or register a rule/handler for it")
        banned[culprits] = True
        skipped.append(reason)
    raise PruningError(f"pruning failed after {MAX_ATTEMPTS} attempts and was rolled back: {skipped[-1]}")


# application ----------------------------------------------------------------------------
def _bisect_failing_group(model, graph, removed, example_inputs, config, groups) -> np.ndarray:
    """Find one group whose removal alone breaks the model, by halving the pruned groups."""
    candidates = [g for g in groups if np.isin(g.atoms, removed).any()]

    def fails(subset: list[Group]) -> bool:
        atoms = np.intersect1d(removed, np.concatenate([g.atoms for g in subset]))
        return not isinstance(_try_apply(model, graph, atoms, example_inputs, config, groups, commit=False), PruneResult)

    while len(candidates) > 1:
        half = candidates[: len(candidates) // 2]
        candidates = half if fails(half) else candidates[len(candidates) // 2:]
    if candidates and fails(candidates):
        return np.intersect1d(removed, candidates[0].atoms)
    return np.zeros(0, dtype=np.int64)


def _try_apply(model, graph, removed, example_inputs, config, groups, commit: bool = True):
    """Apply and check; return a PruneResult, or (atoms to ban, reason) after rolling back.

    With ``commit=False`` the model is rolled back even on success (a dry run).
    """
    removal = graph.removal(removed)
    mask = np.zeros(graph.n_atoms, dtype=bool)
    mask[removed] = True
    touched = [g for g in groups if mask[g.atoms].any()]
    exact = all(g.exact for g in touched)
    reference = _zeroed_outputs(model, removal, example_inputs) if config.verify else None
    tx = Transaction()
    shapes = {name: list(t.shape) for name, t in named_tensors(model).items() if name in removal}
    try:
        _, suspects = apply_removal(graph, removed, tx)
        # without verify the forward only proves the pruned model runs: no selections to record
        actual = run_recorded(model, example_inputs) if reference is not None else run_eval(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - anything the pruned model raises means: roll back
        tx.rollback()
        op = _failing_op(model, graph, example_inputs, removed)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if op is None:
            return np.zeros(0, dtype=np.int64), reason
        culprits = np.concatenate([_atoms_of_op(graph, twin, removed) for twin in _analogous_ops(graph, op)])
        return culprits, f"{op.name} in module '{op.module or '<root>'}': {reason}"
    report = None
    if reference is not None:
        # inexact groups (LayerNorm statistics...) can only be checked for output shapes
        atol, rtol = (config.atol, config.rtol) if exact else (float("inf"), float("inf"))
        report = compare_runs(reference, actual, atol, rtol)
        if not report.ok:
            tx.rollback()
            # a wrong number names no op: the caller bisects the groups to find the one at fault
            names = ", ".join(sorted({f"{op.name} in '{op.module or '<root>'}'" for op in suspects})[:3])
            return np.zeros(0, np.int64), (f"pruned model differs from the zeroed original ({report.message}); "
                                           f"sizes read in Python: {names or 'none'}")
    if not commit:
        tx.rollback()
    plan = PruningPlan([PlanStep({n: {d: idx.tolist() for d, idx in dims.items()} for n, dims in removal.items()},
                                 shapes, tx.changes)])
    params_after = sum(p.numel() for p in model.parameters())
    return PruneResult(plan, 0, 0, 0, params_after, 0.0, len(touched),
                       max_abs_error=report.max_abs_error if report is not None else None)


def _zeroed_outputs(model: nn.Module, removal: dict, example_inputs: ExampleInputs) -> Run:
    """Outputs (and selections) of ``model`` with the removed slices zeroed in place, then
    restored bit for bit."""
    tensors = named_tensors(model)
    saved = {name: tensors[name].detach().clone() for name in removal}
    try:
        zero_removed_(model, removal)
        return run_recorded(model, example_inputs)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                tensors[name].copy_(value)


def _analogous_ops(graph: DependencyGraph, op) -> list:
    """``op`` and the ops at the same place in every other module of the same type: the same
    code runs there, so a size it cannot follow in one block it cannot follow in any."""
    by_module: dict[str, list] = {}
    for other in graph.trace.ops:
        by_module.setdefault(other.module, []).append(other)
    siblings = by_module.get(op.module, [])
    position = next((i for i, o in enumerate(siblings) if o is op), None)
    if position is None or not op.module:
        return [op]
    kind = _lineage(graph.model, op.module)
    twins = [op]
    for name, ops in by_module.items():
        if name and name != op.module and len(ops) == len(siblings) and _lineage(graph.model, name) == kind:
            if ops[position].func == op.func:
                twins.append(ops[position])
    return twins


def _lineage(model: nn.Module, name: str, depth: int = 3) -> tuple[type, ...]:
    """The types of a module and its ``depth`` nearest ancestors: a SiLU inside an attention
    block's norm is not the same code as a SiLU inside a plain bottleneck's."""
    parts = name.split(".")
    return tuple(type(model.get_submodule(".".join(parts[:len(parts) - k]))) for k in range(min(depth + 1, len(parts) + 1)))


def _atoms_of_op(graph: DependencyGraph, op, removed: np.ndarray) -> np.ndarray:
    c = graph.coupling
    ids = [c.ids(n, d) for n in op.inputs + op.outputs for d in range(c.nodes[n].ndim)]
    atoms = sorted_unique(graph.labels[np.concatenate(ids)]) if ids else np.zeros(0, np.int64)
    return np.intersect1d(atoms, removed)


def _failing_op(model, graph, example_inputs, removed):
    """Re-apply the removal on the side and find the first traced op the pruned model fails in."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0
        failed = None  # the aten op that raised

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            try:
                out = func(*args, **(kwargs or {}))
            except Exception:
                Counter.failed = Counter.failed or func
                raise
            Counter.count += 1
            return out

    tx = Transaction()
    try:
        apply_removal(graph, removed, tx)
        try:
            with Counter():
                run_eval(model, example_inputs)
        except Exception:  # noqa: BLE001
            return _traced_op_near(graph.trace.ops, Counter.count, Counter.failed)
        return None
    except Exception:  # noqa: BLE001 - the surgery itself failed; no op to blame
        return None
    finally:
        tx.rollback()


def _traced_op_near(ops: list, index: int, func, window: int = 64):
    """The traced op the pruned model failed in: the one at the same position, or, where the
    pruned run dispatched a few ops more or fewer, the nearest traced call of the failing op."""
    if func is None:
        return ops[index] if index < len(ops) else None
    for offset in range(window + 1):
        for i in (index - offset, index + offset):
            if 0 <= i < len(ops) and ops[i].func == func:
                return ops[i]
    return None
