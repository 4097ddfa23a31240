"""Property tests: random small networks, random channels, always exact.

A hypothesis strategy draws a random DAG of blocks (conv/bn/act, depthwise and grouped
convs, residual adds, sub/mul/div/max, concat on channels and on H, chunk, split and
slices with attribute-held bounds, index_select, SE, layer scale, channel shuffle,
pixel (un)shuffle, pooling, upsampling, transposed convs, BN/IN/GN/LN/FrozenBN, a
channels-last Linear, H/W transposes, dropout; flatten+linear, pooled-linear or conv
heads; tensor/tuple/dict outputs), or a random transformer-ish token model (Linear,
MLP and SwiGLU residuals, grouped-query attention with matmul or SDPA, LayerNorm /
RMSNorm, gates, concat/chunk on the feature dim). It is pruned with
``criterion="random"``, a random ratio in [0.1, 0.7], a random seed and round_to, and
the pruned model must equal the zeroed original (``verify().ok``) with a plan that
describes exactly what happened. Specs containing ops whose channels feed a statistic
over the channel dim (GroupNorm, LayerNorm, RMSNorm, attention) prune with
``exact_only=True``.

``check_case`` is shared with ``benchmarks/property_sweep.py``, which runs the same
generator for many more examples.
"""
from __future__ import annotations

import copy
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.archs import (  # noqa: E402
    attribute_problems, build_from_spec, describe_spec, flat_outputs, generate_cnn_spec, generate_token_spec, num_params, output_structure,
    plan_problems, run, snapshot, snapshot_diff, spec_is_exact,
)

import torchslim  # noqa: E402


class HypothesisChooser:
    """The generator's decisions drawn from hypothesis (so failures shrink to small specs)."""

    def __init__(self, draw):
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, options):
        return self.draw(st.sampled_from(list(options)))


@st.composite
def cnn_specs(draw, max_ops: int = 8, literal: bool = False) -> dict[str, Any]:
    return generate_cnn_spec(HypothesisChooser(draw), max_ops=max_ops, literal=literal)


@st.composite
def token_specs(draw, max_ops: int = 6) -> dict[str, Any]:
    return generate_token_spec(HypothesisChooser(draw), max_ops=max_ops)


ratios = st.floats(0.1, 0.7, allow_nan=False)
seeds = st.integers(0, 2**16)
round_tos = st.sampled_from([1, 1, 2, 4])


def check_case(spec: dict[str, Any], ratio: float, seed: int, round_to: int = 1,
               allow_failure: bool = False) -> dict[str, Any]:
    """Build, prune and check one random network; never raises, returns an outcome record.

    ``ok`` is False with ``stage`` naming the first failed check: ``build``, ``prune``
    (raised; or raised and left the model changed with ``allow_failure``), ``untouched`` (an
    empty plan, yet the model changed), ``forward``,
    ``shapes``, ``accounting``, ``plan`` (plan or module attributes) or ``verify``.
    """
    exact_only = not spec_is_exact(spec)
    outcome: dict[str, Any] = {"ok": False, "stage": "build", "ratio": ratio, "seed": seed, "round_to": round_to,
                               "exact_only": exact_only, "pruned": False, "raised": None, "message": "",
                               "max_abs_error": None, "params_before": None, "params_after": None,
                               "macs_before": None, "macs_after": None, "seconds": 0.0}
    start = time.perf_counter()
    try:
        model, x = build_from_spec(spec, seed)
        original = copy.deepcopy(model)
        reference = run(original, x)
        before = snapshot(model)
        config = torchslim.PruneConfig(ratio=ratio, criterion="random", seed=seed, round_to=round_to,
                                       exact_only=exact_only)
        outcome["stage"] = "prune"
        try:
            result = torchslim.prune_(model, x, config)
        except Exception as exc:  # noqa: BLE001
            outcome["raised"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            problems = snapshot_diff(before, model)
            if problems:
                outcome["message"] = "raised and left the model changed: " + "; ".join(problems[:5])
            elif allow_failure:
                outcome.update(ok=True, stage="done", message="raised, model untouched")
            else:
                outcome["message"] = outcome["raised"]
            return outcome
        outcome.update(params_before=result.params_before, params_after=result.params_after,
                       macs_before=result.macs_before, macs_after=result.macs_after,
                       pruned=bool(result.plan.removed))
        if not result.plan.removed:
            outcome["stage"] = "untouched"
            problems = snapshot_diff(before, model)
            if problems:
                outcome["message"] = "empty plan but the model changed: " + "; ".join(problems[:5])
                return outcome
        outcome["stage"] = "forward"
        out = run(model, x)
        outcome["stage"] = "shapes"
        if output_structure(out) != output_structure(reference):
            outcome["message"] = f"{output_structure(out)} != {output_structure(reference)}"
            return outcome
        if not all(torch.isfinite(t).all() for t in flat_outputs(out) if t.is_floating_point()):
            outcome["message"] = "non-finite outputs"
            return outcome
        outcome["stage"] = "accounting"
        if result.params_before != num_params(original) or result.params_after != num_params(model) \
                or result.macs_after > result.macs_before:
            outcome["message"] = (f"params {result.params_before}->{result.params_after} (really {num_params(original)}->"
                                  f"{num_params(model)}), macs {result.macs_before}->{result.macs_after}")
            return outcome
        outcome["stage"] = "plan"
        problems = plan_problems(result.plan.removed, original, model) + attribute_problems(model)
        if problems:
            outcome["message"] = "; ".join(problems[:5])
            return outcome
        outcome["stage"] = "verify"
        report = torchslim.verify(original, model, x, result.plan)
        outcome["max_abs_error"] = float(report.max_abs_error)
        if not report.ok:
            outcome["message"] = f"differs from the zeroed original by {report.max_abs_error:.3g}"
            return outcome
        outcome.update(ok=True, stage="done")
        return outcome
    except Exception as exc:  # noqa: BLE001 - a crash in a check is a failure of that stage
        outcome["message"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        outcome["traceback"] = traceback.format_exc(limit=6)
        return outcome
    finally:
        outcome["seconds"] = round(time.perf_counter() - start, 4)


def _assert_ok(spec, outcome):
    assert outcome["ok"], (f"stage {outcome['stage']}: {outcome['message']}\n  spec: {describe_spec(spec)}\n"
                           f"  ratio={outcome['ratio']} seed={outcome['seed']} round_to={outcome['round_to']} "
                           f"exact_only={outcome['exact_only']}\n{outcome.get('traceback', '')}")


# derandomize: CI tests the same examples every run; benchmarks/property_sweep.py explores many more
SETTINGS = dict(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(**SETTINGS)
@given(spec=cnn_specs(), ratio=ratios, seed=seeds, round_to=round_tos)
def test_random_cnn_prunes_exactly(spec, ratio, seed, round_to):
    note(describe_spec(spec))
    _assert_ok(spec, check_case(spec, ratio, seed, round_to))


@settings(**SETTINGS)
@given(spec=token_specs(), ratio=ratios, seed=seeds, round_to=round_tos)
def test_random_token_model_prunes_exactly(spec, ratio, seed, round_to):
    note(describe_spec(spec))
    _assert_ok(spec, check_case(spec, ratio, seed, round_to))


@settings(**{**SETTINGS, "max_examples": 15})
@given(spec=cnn_specs(max_ops=5, literal=True), ratio=ratios, seed=seeds)
def test_random_cnn_with_literal_is_all_or_nothing(spec, ratio, seed):
    """With a block that hard-codes its channel count: raise with the model untouched, or be exact."""
    note(describe_spec(spec))
    _assert_ok(spec, check_case(spec, ratio, seed, allow_failure=True))


def test_generators_are_deterministic():
    import random

    from tests.archs import RandomChooser

    for gen in (generate_cnn_spec, generate_token_spec):
        a = gen(RandomChooser(random.Random(7)))
        b = gen(RandomChooser(random.Random(7)))
        assert a == b
        m1, x1 = build_from_spec(a, 3)
        m2, x2 = build_from_spec(b, 3)
        assert torch.equal(x1, x2)
        assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))


@pytest.mark.parametrize("family", ["cnn", "token"])
def test_generated_networks_run(family):
    """The generator only emits well-formed networks (no engine needed)."""
    import random

    from tests.archs import RandomChooser

    gen = generate_cnn_spec if family == "cnn" else generate_token_spec
    for i in range(60):
        spec = gen(RandomChooser(random.Random(i)), **({"literal": i % 4 == 0} if family == "cnn" else {}))
        model, x = build_from_spec(spec, i)
        out = flat_outputs(run(model, x))
        assert out and all(torch.isfinite(t).all() for t in out), describe_spec(spec)
