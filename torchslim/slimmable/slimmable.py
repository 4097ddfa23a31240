"""Slimmable networks on any model the engine covers (Yu et al., "Slimmable Neural Networks",
ICLR 2019; Yu & Huang, "Universally Slimmable Networks and Improved Training Techniques",
ICCV 2019).

``make_slimmable`` sorts every prunable group's channels most important first
(``torchslim.sort_channels_``: a permutation of all coupled tensors, the function unchanged),
then runs the model at a width by keeping each group's first ``ceil(width x C)`` channels (per
class of atoms that can trade places, e.g. per producer of a concat). The channels a width keeps
and the module attributes that follow them (channels, groups of depthwise convs, heads,
features) are the engine's own plan for removing the rest (``plan_removal``), so a model at
width w computes exactly what ``export_width(w)`` physically keeps.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from torchslim._inputs import ExampleInputs
from torchslim.graph import DependencyGraph, Group
from torchslim.graph.macs import estimate_macs
from torchslim.pruning import (PruneConfig, RemovalPlan, eligible_groups, named_tensors, plan_removal, sort_channels_,
                               zero_removed_)
from torchslim.pruning.verify import compare_outputs, run_eval, tolerances
from torchslim.slimmable._runtime import WidthRuntime
from torchslim.slimmable.config import SlimmableConfig, check_width
from torchslim.sparsity import parametrization_problem

LOG = logging.getLogger(__name__)
Width = float | Mapping[int, float]  # one width for every group, or per group index (others at 1.0)
BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
PLAN_CACHE_SIZE = 256  # removal plans kept, least recently used dropped (per-group random widths rarely repeat)


class Slimmable(nn.Module):
    """A model that runs at any configured width, sharing one set of weights.

    ``slim(x)`` (or ``slim.model(x)``) runs at the current width (:meth:`set_width`,
    :meth:`at_width`). ``slim.parameters()`` are the model's full parameters plus, with
    ``switchable_bn``, each width's private BatchNorm parameters: give those to the optimizer.
    """

    def __init__(self, model: nn.Module, example_inputs: ExampleInputs, graph: DependencyGraph, groups: list[Group],
                 config: SlimmableConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.graph = graph
        self.groups = groups
        self.classes = {g.index: graph.interchangeable(g) for g in groups}
        self._width_of_atoms = {g.index: graph.atom_width(g) for g in groups}
        self._plans: OrderedDict[tuple, RemovalPlan | None] = OrderedDict()
        self.left_out: dict[int, str] = {}  # group index -> why it stays at full width
        self.runtime = WidthRuntime(model)
        self._leave_out_groups_that_cannot_narrow(example_inputs)
        self.switchable = nn.ModuleDict()  # width key -> BatchNorm path (dots as "__") -> private copy
        self.width: Width = 1.0
        if config.switchable_bn:
            self._make_switchable_batchnorms()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # widths -----------------------------------------------------------------------------------
    def keep_counts(self, width: Width) -> dict[int, list[int]]:
        """Per group, per class of interchangeable atoms: how many atoms ``width`` keeps."""
        widths = self._per_group(width)
        counts = {}
        for group in self.groups:
            w = widths.get(group.index, 1.0)
            counts[group.index] = [self._keep(len(c), w, self._width_of_atoms[group.index]) for c in self.classes[group.index]]
        return counts

    def removed_atoms(self, width: Width) -> np.ndarray:
        """The atoms ``width`` leaves out: each class's last ones (the least important)."""
        return self._removed(self.keep_counts(width))

    def _removed(self, counts: dict[int, list[int]]) -> np.ndarray:
        """The atoms left out by ``counts`` (as :meth:`keep_counts` gives them)."""
        gone = [c[k:] for g, ks in counts.items() for c, k in zip(self.classes[g], ks)]
        return np.sort(np.concatenate(gone)) if gone else np.zeros(0, dtype=np.int64)

    def plan(self, width: Width) -> RemovalPlan | None:
        """The engine's plan for removing what ``width`` leaves out (None: nothing), cached."""
        counts = self.keep_counts(width)
        key = tuple(k for g in sorted(counts) for k in counts[g])
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        atoms = self._removed(counts)
        plan = self._plans[key] = plan_removal(self.graph, atoms) if atoms.size else None
        if len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return plan

    def macs(self, width: Width = 1.0) -> int:
        """MACs of the model at ``width`` (the engine's count for the traced inputs)."""
        return estimate_macs(self.graph, self.removed_atoms(width))

    def set_width(self, width: Width) -> None:
        """Run every following forward at ``width`` (a number in (0, 1], or {group index: width})."""
        if isinstance(width, (int, float)) and not isinstance(width, bool):
            check_width(width)
            if not self.config.allows(float(width)):
                raise ValueError(f"width {width} is not one this model runs at: {self._describe_widths()}")
        plan = self.plan(width)
        self.runtime.activate(plan, self.batchnorm_values(width))
        self.width = width if not isinstance(width, Mapping) else dict(width)

    @contextlib.contextmanager
    def at_width(self, width: Width) -> Iterator["Slimmable"]:
        """Run at ``width`` inside the block, at the width before after it."""
        before = self.width
        self.set_width(width)
        try:
            yield self
        finally:
            self.set_width(before)

    def remove_hooks(self) -> nn.Module:
        """Give the model back as an ordinary module at full width (its channels stay sorted)."""
        self.runtime.remove()
        return self.model

    # helpers ----------------------------------------------------------------------------------
    def _leave_out_groups_that_cannot_narrow(self, example_inputs: ExampleInputs) -> None:
        """Run each group alone at the smallest width: one that fails (a size written in the
        model's code, e.g. ``x.split(6)``, that no module attribute holds) or, being exact,
        differs from the original with those channels zeroed, stays at full width; why is in
        ``left_out`` and the log."""
        for group in list(self.groups):
            why = self._narrowing_problem(group, example_inputs)
            if why is not None:
                self.left_out[group.index] = why
                LOG.info("slimmable: group %d stays at full width: %s", group.index, why)
                self.groups.remove(group)
                del self.classes[group.index]
        self._plans.clear()

    def _narrowing_problem(self, group: Group, example_inputs: ExampleInputs) -> str | None:
        atoms = self.removed_atoms({group.index: self.config.smallest})
        if not atoms.size:
            return None
        plan = plan_removal(self.graph, atoms)
        suspects = ", ".join(sorted({f"{op.name} in '{op.module or '<root>'}'" for op in plan.unresolved})[:3])
        self.runtime.activate(plan)
        try:
            with torch.no_grad():
                narrowed = run_eval(self.model, example_inputs)
        except Exception as exc:  # noqa: BLE001 - any failure means this group cannot narrow
            return f"{type(exc).__name__}: {str(exc).splitlines()[0]} (sizes read in the code: {suspects or 'none'})"
        finally:
            self.runtime.activate(None)
        if not group.exact:
            return None  # its channels feed a statistic: nothing exact to compare with
        removal = self.graph.removal(atoms)
        tensors = named_tensors(self.model)
        saved = {name: tensors[name].detach().clone() for name in removal}
        try:
            zero_removed_(self.model, {n: {d: idx.tolist() for d, idx in dims.items()} for n, dims in removal.items()})
            with torch.no_grad():
                zeroed = run_eval(self.model, example_inputs)
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    tensors[name].copy_(value)
        atol, rtol = tolerances([*zeroed, *self.model.parameters()])
        report = compare_outputs(zeroed, narrowed, atol, rtol)
        return None if report.ok else f"narrowed outputs differ from the zeroed original ({report.message})"

    def _per_group(self, width: Width) -> dict[int, float]:
        if isinstance(width, Mapping):
            known = {g.index for g in self.groups}
            unknown = sorted(set(width) - known)
            if unknown:
                raise ValueError(f"groups {unknown} are not slimmable groups of this model (those are {sorted(known)})")
            return {int(g): check_width(w) for g, w in width.items()}
        w = check_width(width)
        return {g.index: w for g in self.groups}

    def _keep(self, n: int, width: float, atom_width: int) -> int:
        step = self.config.round_to // math.gcd(self.config.round_to, atom_width)
        keep = int(math.ceil(n * width / step - 1e-9) * step)
        return max(1, min(n, keep))

    def _describe_widths(self) -> str:
        if self.config.width_range is not None:
            return f"any width in [{self.config.width_range[0]}, {self.config.width_range[1]}]"
        return f"the configured widths {list(self.config.widths)}"

    def batchnorm_values(self, width: Width) -> dict[str, torch.Tensor] | None:
        """With switchable BatchNorm: the private tensors of ``width`` by the names of the
        shared ones they stand in for (None without switchable BatchNorm)."""
        if not self.config.switchable_bn:
            return None
        key = width_key(width)
        if key not in self.switchable:
            raise ValueError(f"switchable BatchNorm runs at the configured widths {list(self.config.widths)} only, "
                             f"not at {width}")
        values = {}
        per_width = self.switchable[key]
        assert isinstance(per_width, nn.ModuleDict)
        for path, private in per_width.items():
            name = path.replace("__", ".")
            for attr, tensor in [*private._parameters.items(), *private._buffers.items()]:
                if tensor is not None:
                    values[f"{name}.{attr}"] = tensor
        return values

    def _make_switchable_batchnorms(self) -> None:
        """One private copy of every BatchNorm's affine parameters and statistics per width,
        initialised from the shared ones at that width's channels."""
        for width in self.config.widths:
            plan = self.plan(width)
            kept = plan.kept if plan is not None else {}
            per_width = nn.ModuleDict()
            for path, module in self.model.named_modules():
                if isinstance(module, BATCHNORMS):
                    per_width[path.replace(".", "__")] = _private_copy(module, path, kept)
            self.switchable[width_key(width)] = per_width


def width_key(width: Width) -> str:
    """The key of a width in ``Slimmable.switchable`` (module names cannot hold dots)."""
    if isinstance(width, Mapping):
        return "groups:" + ",".join(f"{g}={w:g}" for g, w in sorted(width.items()))
    return f"{float(width):g}".replace(".", "_")


def _private_copy(module: nn.Module, path: str, kept: dict[str, dict[int, np.ndarray]]) -> nn.Module:
    holder = nn.Module()
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        tensor = getattr(module, attr, None)
        if tensor is None:
            continue
        dims = kept.get(f"{path}.{attr}", {})
        value = tensor.detach().clone()
        for dim, keep in dims.items():
            value = value.index_select(dim, torch.as_tensor(keep, dtype=torch.long))
        if isinstance(tensor, nn.Parameter):
            holder.register_parameter(attr, nn.Parameter(value, requires_grad=tensor.requires_grad))
        else:
            holder.register_buffer(attr, value)
    return holder


def make_slimmable(model: nn.Module, example_inputs: ExampleInputs, config: SlimmableConfig | None = None,
                   **overrides: Any) -> Slimmable:
    """Make ``model`` slimmable in place: sort its channels (outputs unchanged, checked) and
    install the hook that runs it at a width. Returns the :class:`Slimmable` that drives it.

    ``overrides`` set :class:`SlimmableConfig` fields (``widths=``, ``width_range=``, ...).
    """
    return build_slimmable(model, example_inputs, _with_overrides(config or SlimmableConfig(), overrides))


def build_slimmable(model: nn.Module, example_inputs: ExampleInputs, config: SlimmableConfig, *,
                    groups: list[int] | None = None) -> Slimmable:
    """:func:`make_slimmable` with the config given; with ``groups`` (a saved model's slimmable
    group indices) the channels are taken as already sorted and exactly those groups narrow."""
    problem = parametrization_problem(model, "torchslim.slimmable.make_slimmable")
    if problem is not None:
        raise ValueError(problem)
    if groups is not None:
        graph = DependencyGraph.build(model, example_inputs)
        unknown = [g for g in groups if not 0 <= g < len(graph.groups)]
        if unknown:
            raise ValueError(f"groups {unknown} do not exist in this model's graph ({len(graph.groups)} groups): "
                             "is it the model the slimmable checkpoint was made from, traced on the same inputs?")
        slim = Slimmable(model, example_inputs, graph, [graph.groups[g] for g in groups], config)
        if slim.left_out:
            raise ValueError(f"groups {sorted(slim.left_out)} cannot narrow on this model: "
                             f"{'; '.join(slim.left_out.values())}")
        return slim
    selection = PruneConfig(exclude=list(config.exclude), filter_fn=config.filter_fn, exact_only=False,
                            round_to=config.round_to)
    chosen: dict[int, set[int]] = {}

    def eligible(graph: DependencyGraph, group: Group) -> bool:
        if id(graph) not in chosen:
            chosen[id(graph)] = {g.index for g in eligible_groups(graph, selection, quiet=True)}
        return group.index in chosen[id(graph)]

    sort = sort_channels_(model, example_inputs, config.criterion, filter_fn=eligible)
    eligible_now = [g for g in sort.graph.groups if eligible(sort.graph, g)]
    if not eligible_now:
        raise ValueError(f"{type(model).__name__} has no group of channels that can be slimmed "
                         f"({sort.graph.summary()['unsupported_ops'] or 'every channel is pinned'}); "
                         "see torchslim.analyze for what pins them")
    slim = Slimmable(model, example_inputs, sort.graph, eligible_now, config)
    if not slim.groups:
        raise ValueError(f"{type(model).__name__}: no group of channels can run narrower: "
                         f"{'; '.join(sorted(set(slim.left_out.values())))}")
    return slim


def _with_overrides(config: SlimmableConfig, overrides: dict[str, Any]) -> SlimmableConfig:
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SlimmableConfig)})
    if unknown:
        raise TypeError(f"unknown SlimmableConfig field(s) {unknown}")
    return dataclasses.replace(config, **overrides) if overrides else config


def copy_without_hooks(slim: Slimmable) -> nn.Module:
    """A deep copy of the slimmable model at full width without the width hooks."""
    slim.runtime.activate(None)
    try:
        clone = copy.deepcopy(slim.model)
    finally:
        slim.set_width(slim.width)
    ids = {h.id for h in slim.runtime._handles}
    for hooks in (clone._forward_pre_hooks, clone._forward_hooks, clone._forward_hooks_always_called):
        for key in [k for k in hooks if k in ids]:
            del hooks[key]
    return clone
