"""``prune_``: one call that ranks, removes and verifies, in place and all-or-nothing."""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from torchslim.distributed import broadcast_array, broadcast_object, is_distributed, refuse_wrapped
from torchslim._inputs import ExampleInputs
from torchslim.graph import DependencyGraph, Group
from torchslim.graph.dependency import sorted_unique
from torchslim.graph.macs import estimate_macs
from torchslim.pruning._hf_config import sync_hf_config
from torchslim.search import latency_loop  # called at run time: the loop imports this package too
from torchslim.pruning.selector import PruningError, Selector, eligible_groups, warn_nothing_pruned
from torchslim.pruning._surgery import Transaction, apply_removal, named_tensors
from torchslim.pruning.config import PruneConfig
from torchslim.criteria import comparable_across_groups, make_importance
from torchslim.pruning._optimizer_state import check_optimizer, remember_former_shapes, slice_optimizer_state
from torchslim.pruning.plan import PlanStep, PruningPlan, record_history
from torchslim.sparsity import parametrization_problem
from torchslim.pruning._zeroing import zeroed_while_used
from torchslim.pruning.verify import Run, compare_runs, relative_deviation, run_eval, run_recorded, tolerances

LOG = logging.getLogger(__name__)
MAX_ATTEMPTS = 32  # each rolled-back attempt bans the atoms at fault; raft_small at target_macs=0.5 needs 14
# inexact groups whose deviation is measured one by one (two forwards each); beyond this many,
# the rest are reported with deviation None and only count in the total
MAX_INEXACT_MEASURED = 4


class InexactPruningWarning(UserWarning):
    """Removed channels fed a statistic (LayerNorm, softmax, weight standardisation), so the
    pruned model is not the zeroed original; the warning gives each group's measured deviation."""


class RolledBackWarning(UserWarning):
    """A removal failed its check and was undone: its channels stay, so less was pruned than
    the config selected first."""


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
    # per removed group whose channels feed a statistic (not equal to zeroing): its index,
    # modules, why it is inexact, atoms removed and measured deviation (relative L2 error of the
    # outputs vs the zeroed original with only that group removed; None when not measured)
    inexact_groups: list[dict] = dataclasses.field(default_factory=list)
    # relative L2 error of the pruned outputs vs the zeroed original (None: every group exact);
    # prune_experts_: vs the original (None: equal within the dtype's tolerance)
    inexact_deviation: float | None = None
    # prune_experts_: per mixture-of-experts layer, the experts removed (indices before the
    # removal), and every expert's importance (routing frequency on the data)
    experts_removed: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    expert_scores: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "plan"}


@dataclasses.dataclass
class Attempt:
    """What applying one removal gave: on success the step applied (its plan, the groups it
    touched, what the check measured); after a rollback the atoms to ban (empty when no op
    could be named) and why."""

    plan: PruningPlan | None = None
    groups_pruned: int = 0
    max_abs_error: float | None = None
    inexact_groups: list[dict] = dataclasses.field(default_factory=list)
    inexact_deviation: float | None = None
    culprits: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.plan is not None

    @classmethod
    def failed(cls, culprits: np.ndarray, reason: str) -> "Attempt":
        return cls(culprits=culprits, reason=reason)


def prune_(model: nn.Module, example_inputs: ExampleInputs, config: PruneConfig | None = None, *,
           data: Any = None, loss_fn: Any = None, optimizer: torch.optim.Optimizer | None = None) -> PruneResult:
    """Structurally prune ``model`` in place and return what was removed.

    Channels, heads and hidden units are ranked per group by ``config.criterion`` and the
    lowest ``config.ratio`` of each group (or as much as a ``target_macs`` needs) is
    physically removed. The result is checked against the zeroed original on
    ``example_inputs``; on any error the model is left exactly as it was. Data-driven
    criteria (taylor, apoz, mean_activation) measure on ``data`` (an iterable of batches, each
    an input or an ``(input, target)`` pair); taylor also needs ``loss_fn(output, batch)``.

    Parameters stay the same objects (sliced in place), so an optimizer built before keeps
    training them; pass it as ``optimizer`` to slice its per-parameter state (Adam moments,
    momentum) to the kept indices too. The model records the plan in its pruning history
    (``torchslim.pruning_history``), which ``torchslim.save(model, path)`` writes.
    """
    refuse_wrapped(model, "torchslim.prune_")
    check_optimizer(optimizer)
    problem = parametrization_problem(model, "torchslim.prune_")
    if problem is not None:
        raise PruningError(problem)
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
    selector = Selector(graph, groups, scores, config, latency, comparable=comparable_across_groups(importance))
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = selector.macs_before
    banned = np.zeros(graph.n_atoms, dtype=bool)
    skipped: list[str] = []
    target = config.target
    calibration: list[dict] = []
    candidates: list[dict] = []
    if target and target.quantity == "latency":
        selector, calibration = latency_loop.calibrate_latency_goal(selector, graph, example_inputs, config, banned)
    elif target and config.latency_aware:
        selector, candidates = latency_loop.choose_fastest_ranking(selector, graph, example_inputs, config, banned)
    for _ in range(MAX_ATTEMPTS):
        ratio, removed = selector.select(banned)
        if is_distributed():  # rank 0 chooses for every rank (timings and near ties may differ)
            ratio, removed = broadcast_object(ratio), broadcast_array(removed)
        if removed.size == 0:
            _warn_rolled_back(skipped)
            warn_nothing_pruned(selector, banned)
            return PruneResult(PruningPlan(), macs_before, macs_before, params_before, params_before, ratio, 0,
                               skipped=skipped)
        attempt = _try_apply(model, graph, removed, example_inputs, config, groups)
        if attempt.plan is not None:
            result = PruneResult(
                attempt.plan, macs_before, estimate_macs(graph, removed), params_before,
                sum(p.numel() for p in model.parameters()), ratio, attempt.groups_pruned,
                max_abs_error=attempt.max_abs_error, skipped=skipped, hf_config=sync_hf_config(model),
                inexact_groups=attempt.inexact_groups, inexact_deviation=attempt.inexact_deviation)
            if latency is not None:
                result.latency_before_ms = latency.measured_ms
                result.latency_predicted_ms = latency.predict(removed)
                result.latency_calibration = calibration
                result.latency_candidates = candidates
            _record_commit(model, result.plan, optimizer)
            _warn_rolled_back(skipped)
            _warn_inexact(result)
            return result
        culprits, reason = attempt.culprits, attempt.reason
        if culprits.size == 0 or banned[culprits].all():
            # nothing points at an op (e.g. a size read in Python built an output): bisect the groups
            culprits = _bisect_failing_group(model, graph, removed, example_inputs, config, groups)
            if culprits.size and not banned[culprits].all():
                culprit = graph.groups[graph.atom_group[culprits[0]]]
                reason = f"{reason}; it fails alone when removing {_describe_group(culprit)}"
        if culprits.size == 0 or banned[culprits].all():
            raise PruningError(f"pruning failed and was rolled back: {reason}. {_advice(reason, model, config)}")
        banned[culprits] = True
        skipped.append(reason)
        LOG.info("removal rolled back (%s); %d channel(s) of the groups at fault are kept and the selection is "
                 "retried", reason, int(culprits.size))
    raise PruningError(f"pruning failed after {MAX_ATTEMPTS} attempts and was rolled back: {skipped[-1]}")


def remove_(graph: DependencyGraph, atoms: np.ndarray, example_inputs: ExampleInputs, *, verify: bool = True,
            max_inexact_deviation: float | None = PruneConfig.max_inexact_deviation,
            optimizer: torch.optim.Optimizer | None = None) -> PruneResult:
    """Physically remove exactly ``atoms`` (of ``graph``, traced on ``graph.model``) and record
    the step in the model's history, as ``prune_`` does once it has chosen: checked against
    the zeroed original (``verify``), all or nothing (``PruningError`` naming the op at fault,
    model untouched). For callers that choose the channels themselves (slimmable widths, a
    search's winner)."""
    check_optimizer(optimizer)
    model = graph.model
    refuse_wrapped(model, "torchslim.pruning.remove_")
    problem = parametrization_problem(model, "torchslim.pruning.remove_")
    if problem is not None:
        raise PruningError(problem)
    atoms = sorted_unique(np.asarray(atoms, dtype=np.int64))
    if atoms.size and (atoms.min() < 0 or atoms.max() >= graph.n_atoms):
        raise ValueError(f"atoms must be labels of the graph, in [0, {graph.n_atoms})")
    if graph.atom_pinned[atoms].any():
        raise PruningError(f"atoms {atoms[graph.atom_pinned[atoms]][:5].tolist()} are pinned and cannot be removed")
    config = PruneConfig(verify=verify, max_inexact_deviation=max_inexact_deviation)
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = estimate_macs(graph, np.zeros(0, dtype=np.int64))
    if atoms.size == 0:
        return PruneResult(PruningPlan(), macs_before, macs_before, params_before, params_before, 0.0, 0)
    attempt = _try_apply(model, graph, atoms, example_inputs, config, graph.groups)
    if attempt.plan is None:
        raise PruningError(f"removal failed and was rolled back: {attempt.reason}")
    share = atoms.size / max(1, sum(len(g) for g in graph.groups))  # of the prunable atoms
    result = PruneResult(attempt.plan, macs_before, estimate_macs(graph, atoms), params_before,
                         sum(p.numel() for p in model.parameters()), share, attempt.groups_pruned, max_abs_error=attempt.max_abs_error, hf_config=sync_hf_config(model),
                         inexact_groups=attempt.inexact_groups, inexact_deviation=attempt.inexact_deviation)
    _record_commit(model, result.plan, optimizer)
    _warn_inexact(result)
    return result


def _record_commit(model: nn.Module, plan: PruningPlan, optimizer: torch.optim.Optimizer | None) -> None:
    """After a committed removal: slice the optimizer's state, note the parameters' former shapes
    (a step on stale state then fails loudly) and append the plan to the model's history."""
    if optimizer is not None:
        slice_optimizer_state(optimizer, model, plan)
    remember_former_shapes(model, plan)
    record_history(model, plan)


# application ----------------------------------------------------------------------------
def _bisect_failing_group(model, graph, removed, example_inputs, config, groups) -> np.ndarray:
    """Find one group whose removal alone breaks the model, by halving the pruned groups."""
    candidates = [g for g in groups if np.isin(g.atoms, removed).any()]

    def fails(subset: list[Group]) -> bool:
        atoms = np.intersect1d(removed, np.concatenate([g.atoms for g in subset]))
        return not _try_apply(model, graph, atoms, example_inputs, config, groups, commit=False).ok

    while len(candidates) > 1:
        half = candidates[: len(candidates) // 2]
        candidates = half if fails(half) else candidates[len(candidates) // 2:]
    if candidates and fails(candidates):
        return np.intersect1d(removed, candidates[0].atoms)
    return np.zeros(0, dtype=np.int64)


def _try_apply(model, graph, removed, example_inputs, config, groups, commit: bool = True) -> Attempt:
    """Apply and check; on a failure roll back and say which atoms to ban and why.

    Exact groups are checked at tolerance; where inexact groups (LayerNorm statistics...) are
    removed too, the exact part is first checked alone, then the whole removal for structure
    (shapes, finite values) and for its deviation, refused beyond
    ``config.max_inexact_deviation`` (PruningError, model rolled back). With ``commit=False``
    the model is rolled back even on success (a dry run) and deviations are not judged.
    """
    removal = graph.removal(removed)
    mask = np.zeros(graph.n_atoms, dtype=bool)
    mask[removed] = True
    touched = [g for g in groups if mask[g.atoms].any()]
    inexact = [g for g in touched if not g.exact]
    deviations: dict[int, float | None] = {}
    if inexact and config.verify:
        exact_part = np.setdiff1d(removed, np.concatenate([g.atoms for g in inexact]))
        if exact_part.size:
            checked = _try_apply(model, graph, exact_part, example_inputs, config, groups, commit=False)
            if not checked.ok:
                return checked
        if commit and len(inexact) > 1:
            deviations.update(_inexact_group_deviations(model, graph, removed, inexact, example_inputs))
    reference = _zeroed_outputs(graph, removal, example_inputs) if config.verify else None
    tx = Transaction(release=True)
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
            return Attempt.failed(np.zeros(0, dtype=np.int64), reason)
        culprits = np.concatenate([_atoms_of_op(graph, twin, removed) for twin in _analogous_ops(graph, op)])
        return Attempt.failed(culprits, f"{op.name} in module '{op.module or '<root>'}': {reason}")
    report, deviation = None, None
    if reference is not None:
        atol, rtol = tolerances([*reference.outputs, *model.parameters()], config.atol, config.rtol)
        # inexact groups cannot match: here only the structure (shapes, finite values) is checked
        assert isinstance(actual, Run)  # recorded: reference is set
        report = compare_runs(reference, actual, *((math.inf, math.inf) if inexact else (atol, rtol)))
        if not report.ok:
            tx.rollback()
            # a wrong number names no op: the caller bisects the groups to find the one at fault
            names = ", ".join(sorted({f"{op.name} in '{op.module or '<root>'}'" for op in suspects})[:3])
            return Attempt.failed(np.zeros(0, np.int64), f"pruned model differs from the zeroed original "
                                                         f"({report.message}); sizes read in Python: {names or 'none'}")
        if inexact:
            deviation = relative_deviation(reference, actual)
            if len(inexact) == 1:
                deviations = {inexact[0].index: deviation}
    inexact_groups = _inexact_entries(graph, inexact, removed, deviations) if commit else []
    if commit and deviation is not None and not _deviation_allowed(deviation, config):
        tx.rollback()
        raise PruningError(_deviation_refusal(deviation, inexact_groups, config))
    if not commit:
        tx.rollback()
    plan = PruningPlan([_step(graph, removed, removal, shapes, tx.changes)])
    return Attempt(plan, len(touched), max_abs_error=report.max_abs_error if report is not None else None,
                   inexact_groups=inexact_groups, inexact_deviation=deviation)


def _step(graph: DependencyGraph, removed: np.ndarray, removal: dict[str, dict[int, np.ndarray]],
          shapes: dict[str, list[int]], attributes: dict[str, dict[str, Any]]) -> PlanStep:
    """The plan step recording a removal: the sliced tensors, with the index buffers the
    removal renumbers among them (their dropped entries, marked as renumbered)."""
    recorded = {n: {d: idx.tolist() for d, idx in dims.items()} for n, dims in removal.items()}
    renumbered = graph.index_entries_kept(removed)
    for name, kept in renumbered.items():
        size = graph.trace.nodes[graph.trace.param_nodes[name]].shape[0]  # as traced: before this removal
        recorded[name] = {0: np.setdiff1d(np.arange(size), kept).tolist()}
        shapes[name] = [size]
    return PlanStep(recorded, shapes, attributes, renumbered=sorted(renumbered))


def _zeroed_outputs(graph: DependencyGraph, removal: dict, example_inputs: ExampleInputs, forward=run_recorded) -> Run:
    """Outputs (and selections) of ``graph.model`` with the removed slices zeroed, each only
    while the module calls reading it run, then restored bit for bit (``zeroed_while_used``:
    no copy of the whole removal is kept aside)."""
    with zeroed_while_used(graph, removal):
        return forward(graph.model, example_inputs)


# inexact groups ---------------------------------------------------------------------------
def _inexact_group_deviations(model, graph, removed, inexact: list[Group], example_inputs) -> dict[int, float]:
    """Each inexact group's deviation with only its own atoms removed (a dry run each), for
    the ``MAX_INEXACT_MEASURED`` groups losing the most atoms."""
    by_size = sorted(inexact, key=lambda g: -np.intersect1d(removed, g.atoms).size)
    deviations = {}
    for group in by_size[:MAX_INEXACT_MEASURED]:
        atoms = np.intersect1d(removed, group.atoms)
        deviations[group.index] = _group_deviation(model, graph, atoms, example_inputs, recorded=False)
        if math.isinf(deviations[group.index]):  # outputs no longer align: compare what the selections saw
            deviations[group.index] = _group_deviation(model, graph, atoms, example_inputs, recorded=True)
    return deviations


def _group_deviation(model, graph, atoms: np.ndarray, example_inputs, recorded: bool) -> float:
    """Relative L2 error of the outputs with ``atoms`` removed vs zeroed (a dry run). Plain
    forwards unless ``recorded``: recording selections slows every op down."""
    forward = run_recorded if recorded else (lambda m, x: Run(run_eval(m, x), []))
    reference = _zeroed_outputs(graph, graph.removal(atoms), example_inputs, forward)
    tx = Transaction(release=True)
    try:
        apply_removal(graph, atoms, tx)
        return relative_deviation(reference, forward(model, example_inputs))
    except Exception:  # noqa: BLE001 - the whole removal is checked next and names the op
        return math.inf
    finally:
        tx.rollback()


def _deviation_allowed(deviation: float, config: PruneConfig) -> bool:
    return config.max_inexact_deviation is None or deviation <= config.max_inexact_deviation


def _inexact_entries(graph: DependencyGraph, inexact: list[Group], removed: np.ndarray,
                     deviations: dict[int, float | None]) -> list[dict]:
    why = _inexact_reasons(graph, inexact)
    return [{"group": g.index, "modules": _group_modules(g), "why": why[g.index],
             "atoms_removed": int(np.intersect1d(removed, g.atoms).size), "deviation": deviations.get(g.index)}
            for g in inexact]


def _inexact_reasons(graph: DependencyGraph, groups: list[Group], limit: int = 3) -> dict[int, list[str]]:
    """Why each group is inexact: the first ``limit`` distinct ops (with their module) that
    compute a statistic over its channels."""
    consumers: dict[int, list] = {}
    for op in graph.trace.ops:
        for node in op.inputs:
            consumers.setdefault(node, []).append(op)
    reasons: dict[int, list[str]] = {g.index: [] for g in groups}
    for mark in graph.coupling.inexact_reasons:
        ops = consumers.get(mark.node, [])
        reader = next((o for o in ops if mark.reason.startswith(o.name)), ops[0] if ops else None)
        text = mark.reason if reader is None else f"{mark.reason} (in '{reader.module or '<root>'}')"
        assert mark.dim is not None  # Coupling.mark_inexact marks one dimension
        owners = graph.atom_group[sorted_unique(graph.labels[graph.coupling.ids(mark.node, mark.dim)])]
        for index in sorted_unique(owners[owners >= 0]).tolist():
            if index in reasons and text not in reasons[index] and len(reasons[index]) < limit:
                reasons[index].append(text)
    return reasons


def _group_modules(group: Group) -> list[str]:
    """The modules owning the parameters and buffers a group prunes."""
    return sorted({name.rpartition(".")[0] or "<root>" for name, _ in group.params})


def _describe_group(group: Group, limit: int = 4) -> str:
    return f"group {group.index} (modules {_first(_group_modules(group), limit, quote=True)})"


def _describe_inexact(entry: dict) -> str:
    deviation = "not measured" if entry["deviation"] is None else f"{entry['deviation']:.3g}"
    why = f"; {entry['why'][0]}" if entry["why"] else ""
    return f"group {entry['group']} ({_first(entry['modules'], 3)}{why}): {deviation}"


def _first(names: list[str], limit: int, quote: bool = False) -> str:
    shown = ", ".join(f"'{n}'" if quote else n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _by_deviation(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda e: -(e["deviation"] if e["deviation"] is not None else -1.0))


def _deviation_refusal(deviation: float, entries: list[dict], config: PruneConfig) -> str:
    worst = _by_deviation(entries)
    modules = sorted({m for e in worst[:3] for m in e["modules"]})[:6]
    return (f"pruning rolled back, the model is unchanged: removing {len(entries)} inexact group(s) changes the "
            f"outputs by {deviation:.3g} (relative L2 error vs the zeroed original), beyond "
            f"PruneConfig.max_inexact_deviation={config.max_inexact_deviation}. Deviation per group: "
            + "; ".join(_describe_inexact(e) for e in worst[:5])
            + f". To proceed: PruneConfig(exact_only=True) prunes only exact groups, exclude={modules} keeps the "
            "worst groups, or max_inexact_deviation=None accepts the deviation")


def _warn_inexact(result: PruneResult) -> None:
    if not result.inexact_groups:
        return
    total = "not measured (verify=False)" if result.inexact_deviation is None else f"{result.inexact_deviation:.3g}"
    warnings.warn(f"{len(result.inexact_groups)} pruned group(s) are inexact: their channels feed a statistic, so "
                  "removing them is not the same as zeroing them. Outputs deviate from the zeroed original by "
                  f"{total} (relative L2 error); per group: "
                  + "; ".join(_describe_inexact(e) for e in _by_deviation(result.inexact_groups)[:5])
                  + ". PruneResult.inexact_groups lists them all; exact_only=True avoids them",
                  InexactPruningWarning, stacklevel=3)


def _warn_rolled_back(skipped: list[str]) -> None:
    if skipped:
        warnings.warn(f"{len(skipped)} removal(s) failed their check and were rolled back: the channels below stay, "
                      "so the model is pruned less than first selected: " + " | ".join(dict.fromkeys(skipped)),
                      RolledBackWarning, stacklevel=3)


def _advice(reason: str, model: nn.Module, config: PruneConfig) -> str:
    """What to do about a failure that no rollback of a single group could fix; it names a
    module only where the reason does."""
    if " in module '" in reason or "fails alone when removing" in reason:
        return "To proceed: exclude the module named here (PruneConfig.exclude) or register a rule/handler for it"
    advice = ("No single group fails alone: the failure needs several groups removed together. To proceed: prune "
              "fewer groups (PruneConfig.op_names/exclude) to narrow it down")
    if reason.startswith("pruned model differs"):
        atol, rtol = tolerances(model.parameters(), config.atol, config.rtol)
        advice += (f", or, if the difference is rounding adding up over many layers, loosen "
                   f"PruneConfig.atol/rtol (now {atol:g}/{rtol:g})")
    return advice


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

    tx = Transaction(release=True)
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
