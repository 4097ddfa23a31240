"""Exactness check: a pruned model must equal its original with the removed channels zeroed."""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable

import torch
from torch import nn

from torchslim._inputs import ExampleInputs, call_model, iter_tensors
from torchslim.modes import training_mode
from torchslim.pruning._near_ties import Selection, SelectionRecorder, near_tie_explains
from torchslim.pruning._near_ties import _same as same_tensors
from torchslim.pruning._surgery import Transaction, named_tensors
from torchslim.pruning.depth import apply_drops
from torchslim.pruning.plan import PruningPlan

# (atol, rtol) per dtype, rtol relative to each output's magnitude: a pruned model sums its
# channels in another order, which drifts by a few units in the last place per layer (float32:
# ~1e-4 relative in 100-layer models; bfloat16 keeps 8 bits, so resnet50 drifts by ~5e-3),
# while a wrong structure is off by the output's own size. float32 on a GPU with TF32
# enabled computes convolutions and matmuls with float16's 10-bit mantissa.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 5e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}
TF32_TOLERANCES = TOLERANCES[torch.float16]


def tolerances(tensors: Iterable[torch.Tensor], atol: float | None = None,
               rtol: float | None = None) -> tuple[float, float]:
    """``(atol, rtol)`` for outputs computed from ``tensors`` (outputs, parameters): the loosest
    of their dtypes' ``TOLERANCES``; ``atol``/``rtol`` given explicitly win. One function, so
    that ``prune_``'s check and ``verify`` mean the same thing by "exact"."""
    kinds = {(t.dtype, t.device.type) for t in tensors if t.is_floating_point()}
    candidates = [_dtype_tolerances(*kind) for kind in kinds] or [TOLERANCES[torch.float32]]
    loosest_atol, loosest_rtol = max(a for a, _ in candidates), max(r for _, r in candidates)
    return (loosest_atol if atol is None else float(atol), loosest_rtol if rtol is None else float(rtol))


def _dtype_tolerances(dtype: torch.dtype, device_type: str) -> tuple[float, float]:
    if dtype == torch.float32 and device_type == "cuda" and _tf32_enabled():
        return TF32_TOLERANCES
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def _tf32_enabled() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@dataclasses.dataclass
class VerifyReport:
    ok: bool
    max_abs_error: float
    max_rel_error: float
    outputs: int
    message: str = ""

    def __bool__(self) -> bool:
        return self.ok


def zero_removed_(model: nn.Module, removed: dict[str, dict[int, list[int]]]) -> None:
    """Zero, in place, every slice a plan removes (weights, biases and running statistics)."""
    tensors = named_tensors(model)
    with torch.no_grad():
        for name, dims in removed.items():
            if name not in tensors:
                raise KeyError(f"plan names '{name}', which the model does not have")
            for dim, index in dims.items():
                tensors[name].index_fill_(dim, torch.as_tensor(index, dtype=torch.long), 0)


@torch.no_grad()
def run_eval(model: nn.Module, example_inputs: ExampleInputs) -> list[torch.Tensor]:
    """Outputs of ``model`` in eval mode, flattened to a list of tensors; training flags restored."""
    with training_mode(model, False):
        return [t.detach().clone() for t in iter_tensors(call_model(model, example_inputs))]


@dataclasses.dataclass
class Run:
    """A model's outputs on the example inputs, with the selections (top-k, NMS...) it made."""

    outputs: list[torch.Tensor]
    selections: list[Selection]


def run_recorded(model: nn.Module, example_inputs: ExampleInputs) -> Run:
    with SelectionRecorder() as recorder:
        outputs = run_eval(model, example_inputs)
    return Run(outputs, recorder.selections)


def compare_runs(expected: Run, actual: Run, atol: float, rtol: float) -> VerifyReport:
    """``compare_outputs``, except that outputs which differ only because a selection broke a
    near-tie differently (see ``torchslim.pruning._near_ties``) count as exact, with the reason in ``message``."""
    report = compare_outputs(expected.outputs, actual.outputs, atol, rtol)
    if not report.ok:
        reason = near_tie_explains(expected.selections, actual.selections, atol, rtol)
        if reason is not None:
            report.ok, report.message = True, reason
    return report


def compare_outputs(expected: list[torch.Tensor], actual: list[torch.Tensor], atol: float, rtol: float) -> VerifyReport:
    if len(expected) != len(actual):
        return VerifyReport(False, float("inf"), float("inf"), len(actual), f"{len(actual)} outputs, expected {len(expected)}")
    max_abs = max_rel = 0.0
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e.shape != a.shape:
            return VerifyReport(False, float("inf"), float("inf"), len(actual),
                                f"output {i} has shape {tuple(a.shape)}, expected {tuple(e.shape)}")
        if not e.is_floating_point():
            if not torch.equal(e, a):
                return VerifyReport(False, float("inf"), float("inf"), len(actual), f"integer output {i} differs")
            continue
        diff = (e.double() - a.double()).abs()
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            scale = float(e.double().abs().max()) or 1.0
            max_rel = max(max_rel, float(diff.max()) / scale)
            if not torch.allclose(a.double(), e.double(), atol=atol + rtol * scale, rtol=rtol):
                return VerifyReport(False, max_abs, max_rel, len(actual),
                                    f"output {i} ({str(e.dtype).replace('torch.', '')}) differs by "
                                    f"{float(diff.max()):.3g} at magnitude {scale:.3g}, beyond atol {atol:.3g} "
                                    f"+ rtol {rtol:.3g} x magnitude")
    return VerifyReport(True, max_abs, max_rel, len(actual))


def relative_deviation(expected: Run, actual: Run) -> float:
    """How far ``actual`` is from ``expected``: the largest relative L2 error ``|a - e| / |e|``
    over the float outputs (0 = identical, 1 = as large as the output itself, e.g. an output
    collapsed to zero). Where a selection (top-k, NMS) picked differently, so the outputs no
    longer align, the values that selection chose from are compared instead; inf when
    nothing aligns."""
    pairs = _aligned_floats(expected.outputs, actual.outputs)
    if pairs is None:
        pairs = _first_diverging_selection_inputs(expected, actual)
    if pairs is None:
        return float("inf")
    errors = [_relative_l2(e, a) for e, a in pairs]
    return float("nan") if any(math.isnan(r) for r in errors) else max(errors, default=0.0)


def _relative_l2(expected: torch.Tensor, actual: torch.Tensor) -> float:
    error, size = float((actual.double() - expected.double()).norm()), float(expected.double().norm())
    if size == 0:
        return 0.0 if error == 0 else float("inf")
    return error / size


def _aligned_floats(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> list | None:
    if len(expected) != len(actual) or any(e.shape != a.shape for e, a in zip(expected, actual)):
        return None
    return [(e, a) for e, a in zip(expected, actual) if e.is_floating_point()]


def _first_diverging_selection_inputs(expected: Run, actual: Run) -> list | None:
    for e, a in zip(expected.selections, actual.selections):
        if not same_tensors(e.outputs, a.outputs):
            return _aligned_floats(e.inputs, a.inputs)
    return None


def verify(original: nn.Module, pruned: nn.Module, example_inputs: ExampleInputs, plan: PruningPlan,
           atol: float | None = None, rtol: float | None = None) -> VerifyReport:
    """Compare ``pruned`` with a copy of ``original`` whose removed channels are zeroed.

    ``plan`` is the pruning's plan (``PruneResult.plan``); its indices refer to ``original``.
    Tolerances are relative to each output's magnitude; left at None they follow the dtype
    (``tolerances``), the same defaults ``prune_`` checks with, so a pruning ``prune_``
    accepted passes here. A plan that replaces modules (``replace_module_``) or removes whole
    experts (``prune_experts_``) is refused: neither has a "removed channels zeroed" counterpart
    in ``original``. Blocks the plan dropped (depth pruning) are dropped from the copy as well.
    """
    rewrites = [f"step {i + 1}: {', '.join(step.replaced)}" for i, step in enumerate(plan.steps) if step.replaced]
    if rewrites:
        raise ValueError(f"verify compares with the original whose removed channels are zeroed, but this plan "
                         f"replaces modules ({'; '.join(rewrites)}); pass as `original` the model as it was after "
                         f"its last replacement and as `plan` the prunings since (each prune_'s PruneResult.plan)")
    experts = [f"step {i + 1}: {', '.join(step.experts)}" for i, step in enumerate(plan.steps) if step.experts]
    if experts:
        raise ValueError(f"verify compares with the original whose removed channels are zeroed, but this plan removes "
                         f"whole experts ({'; '.join(experts)}), which zeroing does not reproduce (the router would "
                         "still pick them); prune_experts_ measures its deviation from the original itself "
                         "(PruneResult.max_abs_error, inexact_deviation)")
    reference = copy.deepcopy(original)
    if plan.dropped:  # dropped blocks go from the reference too: its names then match the plan's
        apply_drops(reference, plan.dropped, Transaction())
    zero_removed_(reference, {name: dims for name, dims in plan.removed.items() if name not in plan.renumbered})
    expected = run_recorded(reference, example_inputs)
    atol, rtol = tolerances([*expected.outputs, *pruned.parameters()], atol, rtol)
    return compare_runs(expected, run_recorded(pruned, example_inputs), atol, rtol)


