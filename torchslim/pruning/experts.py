"""Whole-expert removal for mixture-of-experts layers: :func:`prune_experts_`.

Why a planner of its own rather than a group of the dependency graph: the graph couples tensor
*dimensions* through the ops that read them, but a router reaches its experts through index
*values*. ``topk`` over the router's expert dim returns integers that pick the experts' rows
(``_grouped_mm``'s offsets, ``histc(bins=num_experts)``, ``one_hot(num_classes=num_experts + 1)``,
a loop over a ``ModuleList``); no op carries the expert dim from the router's output to the
experts' weights, so the graph pins it and has no group for it. The layers are found in the
trace instead, by what they do: a 2-D weight whose output a ``topk``/``argmax`` ranks along a
last dim of E, whose module sits next to either fused expert tensors (E along dim 0) or an
``nn.ModuleList`` of E expert modules. A removal is then an engine
:class:`~torchslim.pruning.RemovalPlan` (router rows and expert slices kept, list entries
dropped, expert counts set) applied by :func:`~torchslim.pruning.apply_plan` inside a
``Transaction`` and recorded as a plan step, exactly like ``prune_``'s: all or nothing, in the
model's pruning history, replayed by ``torchslim.save`` / ``load``.

Exactness: a router that renormalises its top-k weights (Mixtral: softmax, top-k, divide by
their sum) gives the kept experts the same weights once an expert it never picks is gone, so
the outputs are unchanged up to rounding. One that does not (Qwen2-MoE with
``norm_topk_prob=False``: the softmax over *all* experts is the weight) changes every weight
when any expert goes; and removing an expert that is picked changes the routing. Both are
measured (``PruneResult.inexact_deviation``) and warned about, never hidden.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from torchslim._inputs import ExampleInputs, call_model, iter_tensors
from torchslim.criteria.taylor import batch_inputs
from torchslim.graph import OpCall, Trace, trace
from torchslim.graph.macs import has_macs, op_macs
from torchslim.modes import training_mode
from torchslim.pruning._hf_config import sync_hf_config
from torchslim.pruning._optimizer_state import check_optimizer, remember_former_shapes, slice_optimizer_state
from torchslim.pruning._surgery import Transaction, handler_attributes, named_tensors
from torchslim.pruning.apply import RemovalPlan, apply_plan
from torchslim.pruning.plan import PlanStep, PruningPlan, record_history, state_shapes
from torchslim.pruning.prune import InexactPruningWarning, PruneResult
from torchslim.pruning.selector import PruningError
from torchslim.pruning.verify import Run, compare_outputs, relative_deviation, run_eval, tolerances
from torchslim.sparsity import parametrization_problem

__all__ = ["IMPORTANCES", "MoELayer", "moe_layers", "prune_experts_", "routing_frequency"]

LOG = logging.getLogger(__name__)
aten = torch.ops.aten

#: integer attributes that count a layer's experts (module attributes set with the removal)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_routed_experts")
#: how experts are ranked: how often each is in the top-k, or its router probability summed there
IMPORTANCES = ("frequency", "weighted_frequency")
MAX_ROUTING_DEPTH = 8  # ops from a router weight to the op ranking its scores (t, mm, softmax, to, topk)


@dataclasses.dataclass(frozen=True)
class MoELayer:
    """One mixture-of-experts layer: the module holding it, its router and its experts.

    ``experts`` is the fused experts module (``fused``: every tensor of it has the experts along
    dim 0) or the ``nn.ModuleList`` of expert modules; ``top_k`` is read off the traced ranking
    op (``topk``'s k, 1 for ``argmax``)."""

    path: str
    router: str
    experts: str
    num_experts: int
    top_k: int
    fused: bool


@dataclasses.dataclass
class _Routing:
    """What one layer's router chose on the data: token slots and summed probability per expert."""

    slots: np.ndarray
    weight: np.ndarray
    tokens: int = 0
    renormalised: bool | None = None  # the top-k weights sum to 1 (None: the router returns none)

    def share(self, experts: Sequence[int], top_k: int) -> float:
        """The fraction of the routing slots that went to ``experts``."""
        return float(self.slots[list(experts)].sum()) / max(1, self.tokens * top_k)


# finding the layers -----------------------------------------------------------------------
def moe_layers(model: nn.Module, example_inputs: ExampleInputs) -> list[MoELayer]:
    """The mixture-of-experts layers of ``model``, found by tracing it once on ``example_inputs``."""
    return _layers_in(model, trace(model, example_inputs))


def _layers_in(model: nn.Module, recorded: Trace) -> list[MoELayer]:
    consumers: dict[int, list[OpCall]] = {}
    for op in recorded.ops:
        for node in op.inputs:
            consumers.setdefault(node, []).append(op)
    layers: dict[str, MoELayer] = {}
    for name, node in recorded.param_nodes.items():
        shape = recorded.nodes[node].shape
        if len(shape) != 2 or shape[0] < 2:
            continue
        top_k = _routing_k(recorded, consumers, node, shape[0])
        layer = _layer_of_router(model, name.rpartition(".")[0], shape[0], top_k) if top_k else None
        if layer is not None:
            layers.setdefault(layer.path, layer)
    return list(layers.values())


def _routing_k(recorded: Trace, consumers: dict[int, list[OpCall]], weight: int, size: int) -> int | None:
    """k when the scores computed from ``weight`` (a last dim of ``size``) are ranked by a top-k
    within a few ops; None when no op ranks them."""
    frontier, seen = [weight], {weight}
    for _ in range(MAX_ROUTING_DEPTH):
        following = []
        for node in frontier:
            for op in consumers.get(node, []):
                k = _ranked_k(op, recorded, size)
                if k is not None:
                    return k
                fresh = [o for o in op.outputs if o not in seen and recorded.nodes[o].shape[-1:] == (size,)]
                seen.update(fresh)
                following.extend(fresh)
        frontier = following
    return None


def _ranked_k(op: OpCall, recorded: Trace, size: int) -> int | None:
    """How many entries ``op`` picks along a last dim of ``size`` (topk's k; 1 for argmax and max over a dim)."""
    if not op.inputs:
        return None
    shape = recorded.nodes[op.inputs[0]].shape
    if not shape or shape[-1] != size:
        return None
    last = (-1, len(shape) - 1)
    if op.func.overloadpacket is aten.topk:
        k = op.arg(1, "k")
        return k if isinstance(k, int) and op.arg(2, "dim", -1) in last else None
    if op.func.overloadpacket is aten.argmax or op.func is aten.max.dim:
        return 1 if op.arg(1, "dim") in last else None
    return None


def _layer_of_router(model: nn.Module, router_path: str, size: int, top_k: int) -> MoELayer | None:
    """The layer around a router module: its parent, holding exactly one expert store of ``size``."""
    if not router_path:
        return None
    holder_path = router_path.rpartition(".")[0]
    holder, router = model.get_submodule(holder_path), model.get_submodule(router_path)
    stores = [(name, fused) for name, child in holder.named_children()
              if child is not router and (fused := _store_kind(child, size)) is not None]
    if len(stores) != 1:
        LOG.info("'%s' ranks %d scores with a top-%d, but its parent '%s' holds %d expert stores of that size: "
                 "not treated as a mixture-of-experts router", router_path, size, top_k, holder_path or "<root>",
                 len(stores))
        return None
    name, fused = stores[0]
    return MoELayer(holder_path, router_path, _join(holder_path, name), size, top_k, fused)


def _store_kind(module: nn.Module, size: int) -> bool | None:
    """True for fused experts (every own tensor has ``size`` experts along dim 0, a weight is
    3-D), False for an ``nn.ModuleList`` of ``size`` modules of one type, else None."""
    if isinstance(module, nn.ModuleList):
        alike = len(module) == size and len({type(m) for m in module}) == 1
        return False if alike and all(any(True for _ in m.parameters()) for m in module) else None
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if own and all(t.ndim >= 2 and t.shape[0] == size for t in own) and any(t.ndim == 3 for t in own):
        return True
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# routing frequency ------------------------------------------------------------------------
@torch.no_grad()
def routing_frequency(model: nn.Module, layers: Sequence[MoELayer], data: Iterable[Any],
                      weighted: bool = False) -> dict[str, np.ndarray]:
    """Per layer, per expert: the fraction of the tokens of ``data`` (batches, each an input or
    an ``(input, target)`` pair) whose top-k includes it (the layer's sum is its top-k), or with
    ``weighted`` its router probability (softmax over the layer's experts) where it is in the
    top-k, averaged over the tokens. Eval mode; every token counts, padding included."""
    return _scores(_measure_routing(model, layers, data), weighted)


def _scores(routing: dict[str, _Routing], weighted: bool) -> dict[str, np.ndarray]:
    return {path: (r.weight if weighted else r.slots) / max(1, r.tokens) for path, r in routing.items()}


def _measure_routing(model: nn.Module, layers: Sequence[MoELayer], data: Iterable[Any]) -> dict[str, _Routing]:
    routing = {layer.path: _Routing(np.zeros(layer.num_experts), np.zeros(layer.num_experts)) for layer in layers}

    def hook_for(layer: MoELayer):
        return lambda module, inputs, output: _count(routing[layer.path], layer, output)

    handles = [model.get_submodule(layer.router).register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        with torch.no_grad(), training_mode(model, False):
            for batch in data:
                call_model(model, batch_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return routing


def _count(routing: _Routing, layer: MoELayer, output: Any) -> None:
    """Add one router call's choices: its own indices when it returns them (``(..., top_k)``
    integers), else the top-k of its ``(..., num_experts)`` scores."""
    tensors = list(iter_tensors(output))
    n, k = layer.num_experts, layer.top_k
    logits = next((t for t in tensors if t.is_floating_point() and t.ndim and t.shape[-1] == n), None)
    if logits is None:
        raise PruningError(f"router '{layer.router}' returned no (..., {n}) scores to count its choices from")
    scores = logits.detach().reshape(-1, n).float()
    given = next((t for t in tensors if not t.is_floating_point() and t.ndim and t.shape[-1] == k), None)
    index = given.detach().reshape(-1, k).long() if given is not None else scores.topk(k, dim=-1).indices
    chosen = index.flatten().cpu().numpy()
    probability = scores.softmax(-1).gather(1, index).flatten().double().cpu().numpy()
    routing.slots += np.bincount(chosen, minlength=n)[:n]
    routing.weight += np.bincount(chosen, weights=probability, minlength=n)[:n]
    routing.tokens += index.shape[0]
    weights = next((t for t in tensors if t.is_floating_point() and t is not logits and t.ndim and t.shape[-1] == k), None)
    if weights is not None:
        sums_to_one = bool(torch.allclose(weights.detach().float().sum(-1), torch.ones((), device=weights.device),
                                          atol=1e-3))
        routing.renormalised = sums_to_one and routing.renormalised is not False


# choosing ---------------------------------------------------------------------------------
def _chosen_layers(found: list[MoELayer], layers: Sequence[str] | None, model: nn.Module) -> list[MoELayer]:
    """The layers ``layers`` (paths or globs) name; every pattern must name one."""
    if layers is None:
        return found
    if isinstance(layers, str):
        raise ValueError("layers takes a list of module paths or glob patterns, not a string")
    for pattern in layers:
        if not any(fnmatch.fnmatchcase(layer.path, pattern) for layer in found):
            raise ValueError(f"layers: '{pattern}' names no mixture-of-experts layer of {type(model).__name__} "
                             f"(its layers: {_paths(found)})")
    return [layer for layer in found if any(fnmatch.fnmatchcase(layer.path, p) for p in layers)]


def _removal(chosen: list[MoELayer], found: list[MoELayer], scores: dict[str, np.ndarray], model: nn.Module, *,
             ratio: float | None, num_experts: int | None,
             experts: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Per layer, the experts to remove (checked: in range, distinct, top-k still served)."""
    by_path = {layer.path: layer for layer in found}
    if experts is not None:
        removal = {path: _checked_indices(by_path.get(path), path, indices, found, model)
                   for path, indices in experts.items()}
    else:
        removal = {layer.path: _least_important(layer, scores[layer.path], ratio, num_experts) for layer in chosen}
    for path, gone in removal.items():
        layer = by_path[path]
        left = layer.num_experts - len(gone)
        if left < max(1, layer.top_k):
            raise ValueError(f"removing {len(gone)} of the {layer.num_experts} experts of '{path}' would leave {left}, "
                             f"fewer than the {layer.top_k} its router picks per token (top-k); the model is unchanged")
    return {path: gone for path, gone in removal.items() if gone}


def _least_important(layer: MoELayer, scores: np.ndarray, ratio: float | None, num_experts: int | None) -> list[int]:
    """The layer's least important experts (ties: the lower index first), as many as asked."""
    if num_experts is not None:
        count = layer.num_experts - num_experts
    else:
        count = math.floor(float(ratio or 0.0) * layer.num_experts + 1e-9)
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:max(0, count)])


def _checked_indices(layer: MoELayer | None, path: str, indices: Sequence[int], found: list[MoELayer],
                     model: nn.Module) -> list[int]:
    """The experts ``experts=`` names for the layer at ``path``, checked."""
    if layer is None:
        raise ValueError(f"experts: '{path}' is not a mixture-of-experts layer of {type(model).__name__} "
                         f"(its layers: {_paths(found)})")
    values = list(indices) if not isinstance(indices, (str, bytes)) else [indices]
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in values):
        raise ValueError(f"experts['{layer.path}'] must be a list of expert indices, got {indices!r}")
    if any(not 0 <= int(i) < layer.num_experts for i in values) or len(set(map(int, values))) != len(values):
        raise ValueError(f"experts['{layer.path}']: {list(map(int, values))} must be distinct indices in "
                         f"[0, {layer.num_experts})")
    return sorted(int(i) for i in values)


def _paths(layers: list[MoELayer], limit: int = 4) -> str:
    shown = ", ".join(f"'{layer.path}'" for layer in layers[:limit])
    return shown + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


def _check_arguments(ratio: float | None, num_experts: int | None, experts: Any, layers: Any, importance: str) -> None:
    given = [name for name, value in (("ratio", ratio), ("num_experts", num_experts), ("experts", experts))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"prune_experts_ takes exactly one of ratio=, num_experts= and experts=, got "
                         f"{', '.join(given) or 'none'}")
    if ratio is not None and not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio (the fraction of each layer's experts to remove) must be in [0, 1), got {ratio}")
    if num_experts is not None and (isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1):
        raise ValueError(f"num_experts (the experts each layer keeps) must be an integer >= 1, got {num_experts!r}")
    if experts is not None and not isinstance(experts, Mapping):
        raise ValueError(f"experts must map layer paths to expert indices, got {type(experts).__name__}")
    if experts is not None and layers is not None:
        raise ValueError("layers= chooses the layers for ratio= and num_experts=; experts= names its layers itself")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance {importance!r} is unknown; choose one of {', '.join(IMPORTANCES)}")


# planning ---------------------------------------------------------------------------------
def _plan(model: nn.Module, found: list[MoELayer], removal: dict[str, list[int]]) -> RemovalPlan:
    """The removal as an engine plan: router rows and fused expert slices kept along dim 0,
    ``ModuleList`` entries dropped, expert counts (and a router ``nn.Linear``'s width) set."""
    tensors = named_tensors(model)
    kept: dict[str, dict[int, np.ndarray]] = {}
    dropped: dict[str, np.ndarray] = {}
    attributes: dict[str, dict[str, Any]] = {}
    routers = []
    for layer in (layer for layer in found if layer.path in removal):
        keep = np.setdiff1d(np.arange(layer.num_experts), removal[layer.path])
        owners = [layer.router] + ([layer.experts] if layer.fused else [])
        for owner in owners:
            module = model.get_submodule(owner)
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.ndim and tensor.shape[0] == layer.num_experts:
                    kept[_join(owner, name)] = {0: keep}
        if not layer.fused:
            dropped[layer.experts] = np.asarray(removal[layer.path], dtype=np.int64)
        for path in dict.fromkeys([layer.path, *owners]):
            _set_counts(attributes, path, model.get_submodule(path), layer.num_experts, int(keep.size))
        routers.append(model.get_submodule(layer.router))
    shapes = {name: (int(dims[0].size), *tensors[name].shape[1:]) for name, dims in kept.items()}
    planned = handler_attributes(model, routers, {id(tensors[name]): shape for name, shape in shapes.items()})
    for label, attrs in planned.items():
        attributes.setdefault(label, {}).update(attrs)
    _set_model_counts(attributes, model, found, removal)
    return RemovalPlan(np.zeros(0, dtype=np.int64), kept, shapes, attributes, dropped=dropped)


def _set_counts(attributes: dict[str, dict[str, Any]], path: str, module: nn.Module, old: int, new: int) -> None:
    for field in EXPERT_COUNT_FIELDS:
        value = vars(module).get(field)
        if type(value) is int and value == old:
            attributes.setdefault(path, {})[field] = new


def _set_model_counts(attributes: dict[str, dict[str, Any]], model: nn.Module, found: list[MoELayer],
                      removal: dict[str, list[int]]) -> None:
    """Expert counts held outside the layers (a causal LM's ``num_experts`` for its auxiliary
    loss) follow when every layer had and keeps one count; otherwise they stay, as the config does."""
    before = {layer.num_experts for layer in found}
    after = {layer.num_experts - len(removal.get(layer.path, [])) for layer in found}
    if len(before) != 1 or len(after) != 1:
        return
    old, new = before.pop(), after.pop()
    inside = [layer.path for layer in found]
    for name, module in model.named_modules():
        if not any(name == p or name.startswith(p + ".") for p in inside):
            _set_counts(attributes, name, module, old, new)


def _traced_macs(recorded: Trace) -> int:
    """MACs of one traced forward (the convention of ``torchslim.graph.macs``)."""
    return sum(op_macs(op, lambda node: recorded.nodes[node].shape) for op in recorded.ops if has_macs(op))


# the front door ---------------------------------------------------------------------------
def prune_experts_(model: nn.Module, example_inputs: ExampleInputs, *, data: Iterable[Any] | None = None,
                   ratio: float | None = None, num_experts: int | None = None,
                   experts: Mapping[str, Sequence[int]] | None = None, layers: Sequence[str] | None = None,
                   importance: str = "frequency", max_deviation: float | None = None,
                   optimizer: torch.optim.Optimizer | None = None) -> PruneResult:
    """Remove whole experts of the mixture-of-experts layers of ``model``, in place, all or nothing.

    How many, exactly one of: ``ratio`` (the fraction of each layer's experts removed, rounded
    down), ``num_experts`` (the experts each layer keeps) or ``experts`` (``{layer path: [expert
    indices]}``, chosen by hand). With the first two, each layer's least important experts go:
    ``importance="frequency"`` (how often an expert is in the router's top-k on ``data``) or
    ``"weighted_frequency"`` (its router probability summed there); ``data`` is an iterable of
    batches (each an input or an ``(input, target)`` pair), ``[example_inputs]`` when None.
    ``layers`` (paths or globs of the layers, as :func:`moe_layers` lists them) limits which
    layers lose experts. Every layer keeps at least its top-k; anything else is a
    ``ValueError`` naming the layer, with the model untouched.

    The router's rows, the fused expert tensors' slices (or the ``nn.ModuleList`` entries) and
    the expert counts (module attributes; a Hugging Face config when every layer ends alike,
    ``PruneResult.hf_config``) go together, recorded in the pruning history, so
    ``torchslim.save`` / ``load`` and, when uniform, ``save_pretrained`` rebuild the model.
    The outputs on ``example_inputs`` are compared with the model's before: ``max_abs_error``
    always, and when they differ beyond the dtype's tolerance an ``InexactPruningWarning`` and
    ``inexact_deviation`` (relative L2 error) say by how much and why (a removed expert was
    routed to, or the router does not renormalise its top-k weights); beyond ``max_deviation``
    the removal is rolled back (``PruningError``). ``optimizer``: its state is sliced and the
    removed expert modules' parameters leave it.
    """
    check_optimizer(optimizer)
    _check_arguments(ratio, num_experts, experts, layers, importance)
    problem = parametrization_problem(model, "torchslim.prune_experts_")
    if problem is not None:
        raise PruningError(problem)
    recorded = trace(model, example_inputs)
    found = _layers_in(model, recorded)
    if not found:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts layer: no 2-D weight whose scores a "
                         "top-k ranks next to fused expert tensors or a ModuleList of experts")
    chosen = _chosen_layers(found, layers, model)
    routing = _measure_routing(model, found, [example_inputs] if data is None else data)
    scores = _scores(routing, importance == "weighted_frequency")
    removal = _removal(chosen, found, scores, model, ratio=ratio, num_experts=num_experts, experts=experts)
    params_before, macs_before = sum(p.numel() for p in model.parameters()), _traced_macs(recorded)
    result = PruneResult(PruningPlan(), macs_before, macs_before, params_before, params_before, 0.0, 0,
                         expert_scores={path: s.tolist() for path, s in scores.items()})
    if not removal:
        warnings.warn("prune_experts_ removed nothing: the amount asked rounds to no expert in any layer",
                      UserWarning, stacklevel=2)
        return result
    return _commit(model, example_inputs, found, removal, routing, result, max_deviation, optimizer)


def _commit(model: nn.Module, example_inputs: ExampleInputs, found: list[MoELayer], removal: dict[str, list[int]],
            routing: dict[str, _Routing], result: PruneResult, max_deviation: float | None,
            optimizer: torch.optim.Optimizer | None) -> PruneResult:
    """Apply the removal inside a transaction, measure it against the outputs before, record it."""
    plan = _plan(model, found, removal)
    reference = run_eval(model, example_inputs)
    before = state_shapes(model)
    tensors = named_tensors(model)
    shapes = {name: list(tensors[name].shape) for name in plan.kept}
    leaving = [p for path, gone in plan.dropped.items() for i in gone.tolist()
               for p in model.get_submodule(f"{path}.{i}").parameters()]
    tx = Transaction()
    try:
        apply_plan(model, plan, tx)
        actual = run_eval(model, example_inputs)
        macs_after = _traced_macs(trace(model, example_inputs))
    except Exception as exc:  # anything the pruned model raises means: roll back
        tx.rollback()
        layers = [layer for layer in found if layer.path in removal]
        raise PruningError(f"removing experts from {_paths(layers)} failed and was rolled back: "
                           f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc
    report = compare_outputs(reference, actual, *tolerances([*reference, *model.parameters()]))
    deviation = relative_deviation(Run(reference, []), Run(actual, []))
    if max_deviation is not None and not deviation <= max_deviation:
        tx.rollback()
        raise PruningError(f"removing experts rolled back, the model is unchanged: the outputs moved by {deviation:.3g} "
                           f"(relative L2 error), beyond max_deviation={max_deviation}. "
                           + _reasons(found, removal, routing))
    step = PlanStep({name: {0: np.setdiff1d(np.arange(shapes[name][0]), dims[0]).tolist()}
                     for name, dims in plan.kept.items()}, shapes, tx.changes,
                    dropped=[f"{path}.{i}" for path, gone in plan.dropped.items() for i in gone.tolist()],
                    experts=removal)
    result.plan = PruningPlan([step])
    result.macs_after, result.params_after = macs_after, sum(p.numel() for p in model.parameters())
    result.ratio = sum(map(len, removal.values())) / sum(layer.num_experts for layer in found if layer.path in removal)
    result.groups_pruned, result.experts_removed = len(removal), removal
    result.max_abs_error = report.max_abs_error
    result.hf_config = sync_hf_config(model)
    if result.hf_config is None and len({layer.num_experts - len(removal.get(layer.path, [])) for layer in found}) > 1:
        LOG.info("the mixture-of-experts layers now have different numbers of experts: no config describes them, "
                 "so model.config is left alone (torchslim.save / load ship the model)")
    if optimizer is not None:
        slice_optimizer_state(optimizer, model, result.plan)
        _forget(optimizer, leaving)
    remember_former_shapes(model, result.plan)
    record_history(model, result.plan, shapes_before=before)
    if not report.ok:
        result.inexact_deviation = deviation
        warnings.warn(f"removing experts is not exact here: the outputs on the example inputs moved by {deviation:.3g} "
                      f"(relative L2 error; max |difference| {report.max_abs_error:.3g}). "
                      + _reasons(found, removal, routing), InexactPruningWarning, stacklevel=3)
    return result


def _reasons(found: list[MoELayer], removal: dict[str, list[int]], routing: dict[str, _Routing]) -> str:
    """Why each layer's removal moves the outputs: its removed experts were routed to, or its
    router does not renormalise the top-k weights."""
    reasons = []
    for layer in (layer for layer in found if layer.path in removal):
        share = routing[layer.path].share(removal[layer.path], layer.top_k)
        if share > 0:
            reasons.append(f"'{layer.path}': the removed experts {removal[layer.path]} took {share:.1%} of its routing "
                           "slots on the data")
        elif routing[layer.path].renormalised is False:
            reasons.append(f"'{layer.path}': the removed experts were never routed to, but its router does not "
                           "renormalise its top-k weights (a softmax over all experts), so every kept weight changes")
    return "; ".join(reasons) or "The removed experts were never routed to on the data (the example inputs route differently?)"


def _forget(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Take the parameters of removed expert modules out of ``optimizer`` (its groups and state)."""
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for param in [p for p in optimizer.state if id(p) in gone]:
        del optimizer.state[param]
