"""Exactness check: a pruned model must equal its original with the removed channels zeroed."""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from torchslim._inputs import ExampleInputs, call_model, iter_tensors
from torchslim.pruning._selections import Selection, SelectionRecorder, near_tie_explains
from torchslim.pruning._surgery import named_tensors
from torchslim.pruning.plan import PruningPlan


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
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return [t.detach().clone() for t in iter_tensors(call_model(model, example_inputs))]
    finally:
        for m, flag in flags.items():
            m.training = flag


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
    near-tie differently (see ``_selections``) count as exact, with the reason in ``message``."""
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
                return VerifyReport(False, max_abs, max_rel, len(actual), f"output {i} differs by {float(diff.max()):.3g}")
    return VerifyReport(True, max_abs, max_rel, len(actual))


def verify(original: nn.Module, pruned: nn.Module, example_inputs: ExampleInputs, plan: PruningPlan,
           atol: float = 1e-5, rtol: float = 1e-4) -> VerifyReport:
    """Compare ``pruned`` with a copy of ``original`` whose removed channels are zeroed.

    ``plan`` is the pruning's plan (``PruneResult.plan``); its indices refer to ``original``.
    Tolerances are relative to each output's magnitude.
    """
    reference = copy.deepcopy(original)
    zero_removed_(reference, plan.removed)
    return compare_runs(run_recorded(reference, example_inputs), run_recorded(pruned, example_inputs), atol, rtol)


