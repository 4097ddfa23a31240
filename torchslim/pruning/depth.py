"""Depth pruning: remove whole blocks (transformer layers, residual blocks) of a model.

A block is an entry of an ``nn.ModuleList`` or ``nn.Sequential`` that maps its input to an
output of the same shape (a decoder layer, a ResNet bottleneck without downsampling), so
the model without it is the model with it replaced by the identity. Blocks are ranked by
the Block Influence of Men et al. (ShortGPT, 2024), also used by Minitron (Muralidharan et
al., NeurIPS 2024) for depth: ``1 - cos(x_in, x_out)`` averaged over the feature vectors of
calibration data (each token of a ``(batch, tokens, hidden)`` state, each position of a
``(batch, channels, ...)`` map), so a block that barely turns its input is the first to go.
A user score (``importance=evaluate``, higher is better, measured with each block removed
in turn) ranks by what the user cares about instead.

Dropping renumbers the container (``layers.5`` becomes ``layers.4`` when ``layers.2``
goes) and is recorded as a plan step, so ``torchslim.save`` / ``torchslim.load`` replay it
on a freshly built model. On a Hugging Face model whose layer list is dropped from, the
config follows (``num_hidden_layers``, per-layer ``layer_types``, ``mlp_only_layers``) and
every attention's ``layer_idx`` counts the kept layers, so caches, ``generate`` and
``save_pretrained`` / ``from_pretrained`` see the shorter model.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from torchslim._inputs import ExampleInputs, call_model
from torchslim.criteria.taylor import batch_inputs
from torchslim.distributed import all_reduce_arrays, refuse_wrapped, require_same
from torchslim.analysis import profile_macs
from torchslim.pruning._hf_config import hf_config_of, sync_hf_config
from torchslim.pruning._surgery import Transaction
from torchslim.pruning.plan import PlanStep, PruningPlan, record_history, state_shapes
from torchslim.pruning.selector import PruningError

Evaluate = Callable[[nn.Module], float]
CONTAINERS = (nn.ModuleList, nn.Sequential)
#: config fields holding one entry per layer (sliced) and lists of layer indices (renumbered)
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers", "activation_sparsity_pattern")
LAYER_INDEX_FIELDS = ("mlp_only_layers",)


@dataclasses.dataclass
class DepthResult:
    """What :func:`prune_depth_` did: ``dropped`` blocks (names before the drop, least important
    first), every candidate's ``scores`` (higher = more needed), MACs of one forward pass on the
    example inputs before and after, and the HF config fields changed (None without a config)."""

    dropped: list[str]
    scores: dict[str, float]
    macs_before: int
    macs_after: int
    plan: PruningPlan
    hf_config: dict[str, Any] | None = None

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"dropped": self.dropped, "scores": self.scores, "macs_before": self.macs_before,
                "macs_after": self.macs_after, "hf_config": self.hf_config}


def droppable_blocks(model: nn.Module, example_inputs: ExampleInputs, blocks: Sequence[str] | None = None) -> list[str]:
    """The entries of ``nn.ModuleList`` / ``nn.Sequential`` containers that hold submodules and
    parameters, ran exactly once on ``example_inputs`` and returned a tensor shaped like their
    first input (the identity could stand in for them), outermost only; ``blocks`` (globs over
    module paths) narrows them."""
    entries = [path for path, entry in _container_entries(model) if (blocks is None or _matches(path, blocks))
               and next(entry.children(), None) is not None and next(entry.parameters(), None) is not None]
    seen = _observe(model, example_inputs, entries)
    found = [path for path in entries if seen[path].droppable]
    return [path for path in found if not any(path.startswith(other + ".") for other in found)]


def block_importance(model: nn.Module, data: Iterable[Any], blocks: Sequence[str], *,
                     importance: str | Evaluate = "cosine", max_batches: int | None = None) -> dict[str, float]:
    """Score each block (higher = more needed): ``"cosine"`` is the Block Influence
    ``1 - mean cos(x_in, x_out)`` over the feature vectors of ``data`` batches; a callable
    ``evaluate(model) -> float`` (higher is better) scores each block by how much the
    evaluation drops when it alone is removed."""
    if callable(importance):
        return _evaluated_importance(model, blocks, importance)
    if importance != "cosine":
        raise ValueError(f"importance must be 'cosine' or a callable evaluate(model) -> float, got {importance!r}")
    sums = {path: 0.0 for path in blocks}
    counts = {path: 0 for path in blocks}
    batches = 0
    for batch in data:
        if max_batches is not None and batches >= max_batches:
            break
        for path, record in _observe(model, batch_inputs(batch), list(blocks)).items():
            if record.cosines is None:
                raise PruningError(f"block '{path}' did not map a tensor to one of the same shape on calibration "
                                   f"batch {batches} ({record.why}); it cannot be scored or dropped")
            sums[path] += float(record.cosines.sum())
            counts[path] += record.cosines.numel()
        batches += 1
    summed = all_reduce_arrays({**{("sum", p): v for p, v in sums.items()},  # under torchrun: every rank's data
                                **{("count", p): c for p, c in counts.items()}})
    sums = {path: summed[("sum", path)] for path in blocks}
    counts = {path: summed[("count", path)] for path in blocks}
    if batches == 0:
        raise ValueError("block_importance needs at least one calibration batch in data=")
    return {path: 1.0 - sums[path] / counts[path] for path in blocks}


def prune_depth_(model: nn.Module, example_inputs: ExampleInputs, num_blocks: int, *,
                 data: Iterable[Any] | None = None, blocks: Sequence[str] | None = None,
                 importance: str | Evaluate = "cosine", max_batches: int | None = None) -> DepthResult:
    """Drop the ``num_blocks`` least important blocks of ``model`` in place (see the module
    docstring for the ranking); ``data`` are calibration batches (default: the example inputs),
    ``blocks`` globs restrict the candidates (default: every droppable block). Recorded in the
    model's pruning history; all or nothing."""
    refuse_wrapped(model, "torchslim.prune_depth_")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    candidates = droppable_blocks(model, example_inputs, blocks)
    if len(candidates) <= num_blocks:
        where = f" matching {list(blocks)}" if blocks is not None else ""
        raise PruningError(f"{type(model).__name__} has {len(candidates)} droppable block(s){where} "
                           f"({', '.join(candidates[:6]) or 'none'}); cannot drop {num_blocks} and keep one")
    batches = list(data) if data is not None else [example_inputs]
    scores = block_importance(model, batches, candidates, importance=importance, max_batches=max_batches)
    chosen = sorted(candidates, key=lambda path: (scores[path], candidates.index(path)))[:num_blocks]
    require_same(chosen, "blocks to drop")  # under torchrun: scores are summed over ranks, so they agree
    macs_before = _total_macs(model, example_inputs)
    plan, hf_fields = drop_blocks_(model, chosen)
    return DepthResult(chosen, scores, macs_before, _total_macs(model, example_inputs), plan, hf_fields)


def drop_blocks_(model: nn.Module, blocks: Sequence[str]) -> tuple[PruningPlan, dict[str, Any] | None]:
    """Remove the container entries ``blocks`` from ``model`` in place, all or nothing, and record
    it in the model's pruning history; returns the plan step and the HF config fields changed
    (None when no config describes the model). The caller vouches that each block may go (see
    :func:`droppable_blocks`); paths are checked to be entries of ``ModuleList`` / ``Sequential``."""
    dropped = list(dict.fromkeys(blocks))
    if not dropped:
        raise ValueError("drop_blocks_ needs at least one block path")
    before = state_shapes(model)
    tx = Transaction()
    try:
        changed = apply_drops(model, dropped, tx)
        synced = sync_hf_config(model)
    except BaseException:
        tx.rollback()
        raise
    plan = PruningPlan([PlanStep({}, {}, {}, dropped=dropped)])
    record_history(model, plan, shapes_before=before)
    if changed is not None and synced:
        changed.update(synced)
    return plan, changed


def apply_drops(model: nn.Module, dropped: Sequence[str], tx: Transaction, *,
                follow_config: bool = True) -> dict[str, Any] | None:
    """Remove the entries ``dropped`` (paths before the drop) through ``tx``, innermost containers
    first, and (``follow_config``) make a Hugging Face model's layer-indexed config fields and
    ``layer_idx`` follow. ``ValueError`` names a path that is not an entry of a container
    (nothing changed then, once ``tx`` rolls back). Returns the HF config fields changed, or
    None without an HF config."""
    config = hf_config_of(model) if follow_config else None
    fields: dict[str, Any] | None = {} if config is not None else None
    layer_list = _hf_layer_list(model, config)
    for container_path, indices in sorted(_by_container(model, dropped).items(), key=lambda c: -_depth(c[0])):
        container = model.get_submodule(container_path) if container_path else model
        size = len(container._modules)  # all of them may go: an empty Sequential is the identity
        if fields is not None and container_path == layer_list:
            fields.update(_follow_layer_list(config, container, indices, tx))
        elif fields is not None and isinstance(container, nn.ModuleList) and layer_list is None \
                and size == getattr(config, "num_hidden_layers", None) and _indexed_layers(container):
            raise ValueError(f"cannot tell which of {type(model).__name__}'s lists of {size} modules its "
                             f"config's num_hidden_layers counts, so dropping from '{container_path}' would leave the "
                             "config wrong")
        tx.drop_entries(container, indices)
    return fields


# ----------------------------------------------------------------------------------------
# finding and observing blocks
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Observed:
    calls: int = 0
    cosines: torch.Tensor | None = None
    why: str = "it never ran"

    @property
    def droppable(self) -> bool:
        return self.calls == 1 and self.cosines is not None


def _container_entries(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{path}.{key}" if path else key, entry)
            for path, container in model.named_modules() if isinstance(container, CONTAINERS)
            for key, entry in container._modules.items() if entry is not None]


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _observe(model: nn.Module, example_inputs: ExampleInputs, paths: list[str]) -> dict[str, _Observed]:
    """Run ``model`` once, recording per block how often it ran and, when its output is shaped
    like its first input, the cosine of each feature vector of the output with the input's."""
    seen = {path: _Observed() for path in paths}

    def hook(path: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            entry = seen[path]
            entry.calls += 1
            x_in = args[0] if args else next(iter(kwargs.values()), None)
            x_out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not (isinstance(x_in, torch.Tensor) and isinstance(x_out, torch.Tensor)):
                entry.cosines, entry.why = None, "its first input or output is not a tensor"
            elif x_in.shape != x_out.shape or x_in.dtype != x_out.dtype:
                entry.cosines = None
                entry.why = f"it maps {list(x_in.shape)} {x_in.dtype} to {list(x_out.shape)} {x_out.dtype}"
            else:
                entry.cosines = _feature_cosines(x_in.detach(), x_out.detach())
        return record

    handles = [model.get_submodule(path).register_forward_hook(hook(path), with_kwargs=True) for path in paths]
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _feature_cosines(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Cosine of each feature vector: the last dim of (batch, tokens, hidden) and (batch, hidden),
    the channel dim (1) of (batch, channels, ...) maps."""
    dim = 1 if x_in.ndim >= 4 else -1
    return nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=dim, eps=1e-12).flatten()


def _total_macs(model: nn.Module, example_inputs: ExampleInputs) -> int:
    with torch.no_grad():
        return profile_macs(model, example_inputs)[0].total


def _evaluated_importance(model: nn.Module, blocks: Sequence[str], evaluate: Evaluate) -> dict[str, float]:
    """How much ``evaluate`` drops when each block alone is removed (and put back)."""
    base = float(evaluate(model))
    scores = {}
    for path in blocks:
        tx = Transaction()
        try:
            apply_drops(model, [path], tx)
            score = float(evaluate(model))
        finally:
            tx.rollback()
        if not math.isfinite(score):
            raise ValueError(f"evaluate returned {score} with block '{path}' removed; it must be a finite number")
        scores[path] = base - score
    return scores


# ----------------------------------------------------------------------------------------
# dropping
# ----------------------------------------------------------------------------------------
def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def _by_container(model: nn.Module, dropped: Sequence[str]) -> dict[str, set[int]]:
    """The dropped entries by container path, each checked to be an entry of a container."""
    overlapping = [(a, b) for a in dropped for b in dropped if b.startswith(a + ".")]
    if overlapping:
        raise ValueError(f"'{overlapping[0][1]}' lies inside '{overlapping[0][0]}', which is dropped too")
    by_container: dict[str, set[int]] = {}
    for path in dropped:
        container_path, _, key = path.rpartition(".")
        try:
            container = model.get_submodule(container_path) if container_path else model
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module '{container_path}' (dropping '{path}')") from None
        if not isinstance(container, CONTAINERS):
            raise ValueError(f"'{path}' is not an entry of an nn.ModuleList or nn.Sequential ('{container_path}' is "
                             f"a {type(container).__name__}): only such entries can be dropped whole")
        if not (key.isascii() and key.isdigit()) or int(key) >= len(container._modules):
            raise ValueError(f"'{container_path}' ({type(container).__name__} of {len(container._modules)}) has no entry "
                             f"'{key}' (dropping '{path}')")
        by_container.setdefault(container_path, set()).add(int(key))
    return by_container


def _hf_layer_list(model: nn.Module, config: Any) -> str | None:
    """The path of the ModuleList the config counts with ``num_hidden_layers``: the one list of
    that length, or else the one whose i-th entry holds an attention of ``layer_idx`` i (a list
    of as many experts is not it); None when no list or several qualify."""
    count = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not isinstance(count, int):
        return None
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(lists) > 1:
        lists = [(path, m) for path, m in lists if _indexed_layers(m)]
    return lists[0][0] if len(lists) == 1 else None


def _indexed_layers(container: nn.Module) -> bool:
    """Whether the i-th entry of ``container`` holds a module of ``layer_idx`` i (a layer list)."""
    return all(any(getattr(sub, "layer_idx", None) == i for sub in entry.modules())
               for i, entry in enumerate(container._modules.values()) if entry is not None)


def _follow_layer_list(config: Any, layers: nn.Module, gone: set[int], tx: Transaction) -> dict[str, Any]:
    """Config fields and ``layer_idx`` attributes of a Hugging Face layer list losing ``gone``."""
    entries = [m for m in layers._modules.values() if m is not None]
    count = len(entries)
    kept = [i for i in range(count) if i not in gone]
    changes: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for field in PER_LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (list, tuple)) and len(value) == count:
            changes[field] = type(value)(value[i] for i in kept)
    for field in LAYER_INDEX_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (list, tuple)):
            changes[field] = type(value)(kept.index(i) for i in value if i in kept)
    for field, value in changes.items():
        tx.setattr(config, field, value)
    for new, old in enumerate(kept):
        for module in entries[old].modules():
            if getattr(module, "layer_idx", None) == old:
                tx.setattr(module, "layer_idx", new)
    return changes
