"""Slimmable networks on the engine: sorting keeps the function, every width runs exactly as the
model exported at that width, gradients reach exactly the kept slices, switchable BatchNorm keeps
per-width statistics, the sandwich step equals its hand-built sum, and bad input is refused."""
from __future__ import annotations

import copy
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.archs import ARCHS, assert_outputs_close, flat_outputs, run  # noqa: E402

from torchslim.models.digits import DigitsCNN  # noqa: E402
from torchslim.recovery import recalibrate_bn_  # noqa: E402
from torchslim.slimmable import (calibrate_bn, export_width, make_slimmable, sandwich_step,  # noqa: E402
                                 sandwich_widths, soft_target_loss, width_key)
from torchslim.slimmable.slimmable import PLAN_CACHE_SIZE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = (0.25, 0.5, 0.75, 1.0)
COVERED = [n for n in sorted(ARCHS) if n != "nothing_prunable"]
NAMES = [pytest.param(n, marks=pytest.mark.slow) if ARCHS[n].slow else n for n in COVERED]


@pytest.mark.parametrize("name", NAMES)
def test_every_width_runs_exactly_as_the_model_exported_at_that_width(name):
    model, x = ARCHS[name]()
    expected = [t.clone() for t in flat_outputs(run(model, x))]
    slim = make_slimmable(model, x, widths=WIDTHS)
    assert_outputs_close(expected, flat_outputs(run(slim.model, x)))  # sorting the channels kept the function
    full_macs = slim.macs(1.0)
    for width in WIDTHS[:-1]:
        with slim.at_width(width):
            narrow = [t.clone() for t in flat_outputs(run(slim.model, x))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = export_width(slim, width, x)
        assert_outputs_close(narrow, flat_outputs(run(small, x)))
        assert slim.macs(width) < full_macs
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in slim.model.parameters())
    assert_outputs_close(expected, flat_outputs(run(slim.model, x)))  # back at full width after the blocks


def test_gradients_at_half_width_reach_exactly_the_kept_slices():
    torch.manual_seed(0)
    model = DigitsCNN().train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    slim = make_slimmable(model, x[:2], widths=(0.5, 1.0))
    small = export_width(slim, 0.5, x[:2]).train()
    slim.set_width(0.5)
    F.cross_entropy(slim(x), y).backward()
    F.cross_entropy(small(x), y).backward()
    plan = slim.plan(0.5)
    full = dict(slim.model.named_parameters())
    for name, p in small.named_parameters():
        grad = full[name].grad
        kept = plan.kept.get(name, {})
        index = [torch.as_tensor(kept[d]) if d in kept else torch.arange(s) for d, s in enumerate(grad.shape)]
        sliced = grad[torch.meshgrid(*index, indexing="ij")]
        torch.testing.assert_close(sliced, p.grad, atol=1e-6, rtol=1e-5)
        mask = torch.zeros_like(grad, dtype=torch.bool)
        mask[torch.meshgrid(*index, indexing="ij")] = True
        assert torch.count_nonzero(grad[~mask]) == 0, f"{name}: gradient outside the kept slice"


def test_switchable_batchnorm_keeps_separate_statistics_per_width():
    torch.manual_seed(0)
    model = DigitsCNN()
    x = torch.randn(32, 1, 8, 8)
    slim = make_slimmable(model, x[:2], widths=(0.5, 1.0), switchable_bn=True)
    bn_names = [n for n, m in slim.model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    private = {w: slim.switchable[key] for w, key in ((0.5, "0_5"), (1.0, "1"))}
    before = {w: {n: private[w][n.replace(".", "__")].running_mean.clone() for n in bn_names} for w in private}
    shared = {n: slim.model.get_submodule(n).running_mean.clone() for n in bn_names}
    slim.train()
    with slim.at_width(0.5):
        slim(x)
    for n in bn_names:
        key = n.replace(".", "__")
        assert not torch.equal(private[0.5][key].running_mean, before[0.5][n])  # this width's statistics moved
        assert torch.equal(private[1.0][key].running_mean, before[1.0][n])  # the other width's did not
        assert torch.equal(slim.model.get_submodule(n).running_mean, shared[n])  # nor the shared ones
    params = {id(p) for p in slim.parameters()}
    assert all(id(p) in params for holder in private[0.5].values() for p in holder.parameters())
    slim.eval()
    small = export_width(slim, 0.5, x[:2])
    for n in bn_names:
        assert torch.equal(small.get_submodule(n).running_mean, private[0.5][n.replace(".", "__")].running_mean)


def test_calibrating_a_width_equals_recalibrating_the_exported_model():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    slim = make_slimmable(model, batches[0][:2], width_range=(0.25, 1.0), widths=(0.25, 1.0))
    reference = export_width(slim, 0.4, batches[0][:2])
    recalibrate_bn_(reference, batches)
    assert calibrate_bn(slim, batches, 0.4) == 4
    calibrated = export_width(slim, 0.4, batches[0][:2])
    for (name, a), (_, b) in zip(reference.named_buffers(), calibrated.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="no batches"):
        calibrate_bn(slim, [], 0.5)


@pytest.mark.parametrize("widths", [0.5, "uneven"])
def test_cuts_kept_between_forwards_follow_in_place_changes(widths):
    """Without autograd a width's cuts are made once and reused: an in-place change of the full
    weights (an optimizer step) or statistics (a calibration) must still reach the next forward,
    which then equals the model exported from the changed weights."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    slim = make_slimmable(DigitsCNN().eval(), x, width_range=(0.25, 1.0))
    width = 0.5 if widths == 0.5 else {g.index: 0.3 + 0.2 * i for i, g in enumerate(slim.groups)}
    batch = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), slim.at_width(width):
        first = slim(batch)
        torch.testing.assert_close(slim(batch), first)  # the kept cuts give the same result
        for parameter in slim.model.parameters():
            parameter.mul_(1.5)
        for module in slim.model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(0.3)
                module.running_var.mul_(2.0)
        changed = slim(batch)
    assert not torch.allclose(changed, first, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(changed, export_width(slim, width, x)(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_sandwich_step_accumulates_the_hand_built_sum_of_its_losses(layerwise):
    torch.manual_seed(0)
    model = DigitsCNN().eval()  # eval: BatchNorm uses fixed statistics, so the sum is order-free
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    slim = make_slimmable(model, x[:2], width_range=(0.25, 1.0), widths=(0.25, 1.0))
    widths = sandwich_widths(slim, 2, random.Random(7), layerwise=layerwise)
    assert widths[:2] == [1.0, 0.25] and len(widths) == 4
    losses = sandwich_step(slim, x, y, F.cross_entropy, n_random=2, rng=random.Random(7), layerwise=layerwise)
    got = {n: p.grad.clone() for n, p in slim.named_parameters()}
    slim.zero_grad()
    with slim.at_width(1.0):
        teacher = slim(x)
    total = F.cross_entropy(teacher, y)
    for w in widths[1:]:
        with slim.at_width(w):
            total = total + soft_target_loss(slim(x), teacher.detach())
    total.backward()
    for n, p in slim.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    assert list(losses) == [width_key(w) for w in widths] and slim.width == 1.0


def test_distillation_starts_after_the_warmup_epochs(monkeypatch):
    """``distill_warmup=k``: the first k epochs train every width on the labels, the rest distil."""
    import torchslim.slimmable.train as train

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    slim = make_slimmable(DigitsCNN().eval(), x, width_range=(0.25, 1.0), widths=(0.25, 1.0))
    loader = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    seen, real = [], train.sandwich_step
    monkeypatch.setattr(train, "sandwich_step", lambda *a, **k: seen.append(k["distill"]) or real(*a, **k))
    train.train_sandwich(slim, loader, 3, distill_warmup=2, n_random=1)
    assert seen == [False] * 6 + [True] * 3
    seen.clear()
    train.train_sandwich(slim, loader, 2, distill=False, distill_warmup=1, n_random=1)
    assert seen == [False] * 6  # no distillation asked for: none after the warm-up either
    state = {k: v.clone() for k, v in slim.state_dict().items()}
    with pytest.raises(ValueError, match="distill_warmup"):
        train.train_sandwich(slim, loader, 2, distill_warmup=3)
    assert all(torch.equal(v, slim.state_dict()[k]) for k, v in state.items())


def test_layerwise_draws_give_every_group_its_own_width_in_the_range():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    slim = make_slimmable(DigitsCNN().eval(), x, width_range=(0.25, 1.0), widths=(0.25, 1.0))
    draws = [w for _ in range(20) for w in sandwich_widths(slim, 3, random.Random(len(slim.groups)), layerwise=True)[2:]]
    groups = sorted(g.index for g in slim.groups)
    assert len(groups) > 1 and all(sorted(d) == groups for d in draws)
    assert all(0.25 <= w <= 1.0 for d in draws for w in d.values())
    assert any(len(set(d.values())) == len(groups) for d in draws)  # not one width copied to every group
    discrete = make_slimmable(DigitsCNN().eval(), x, widths=(0.5, 1.0))
    with pytest.raises(ValueError, match="width_range"):
        sandwich_widths(discrete, 2, random.Random(0), layerwise=True)


def test_removal_plans_are_cached_up_to_a_bound():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    slim = make_slimmable(DigitsCNN().eval(), x, width_range=(0.25, 1.0), widths=(0.25, 1.0))
    rng = random.Random(0)
    first = slim.plan(0.5)
    assert slim.plan(0.5) is first  # a hit gives the same plan back
    for _ in range(PLAN_CACHE_SIZE + 20):
        slim.plan({g.index: rng.uniform(0.25, 1.0) for g in slim.groups})
    assert len(slim._plans) <= PLAN_CACHE_SIZE
    again = slim.plan(0.5)  # dropped long ago: made again, equal to the first
    assert again is not first and np.array_equal(again.removed_atoms, first.removed_atoms)


def test_bad_input_is_refused_and_the_model_left_as_it_was():
    model, x = ARCHS["residual_add"]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, message in [({"widths": (0.0, 1.0)}, r"in \(0, 1\]"), ({"widths": (0.5, 1.5)}, r"in \(0, 1\]"),
                            ({"width_range": (0.5, 1.0), "widths": (0.25, 1.0)}, "outside width_range"),
                            ({"width_range": (0.25, 1.0), "switchable_bn": True}, "switchable_bn"),
                            ({"round_to": 0}, "round_to"), ({"wdths": (0.5,)}, "unknown SlimmableConfig")]:
        with pytest.raises((ValueError, TypeError), match=message):
            make_slimmable(model, x, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    none, xn = ARCHS["nothing_prunable"]()
    with pytest.raises(ValueError, match="no group of channels"):
        make_slimmable(none, xn)
    slim = make_slimmable(copy.deepcopy(model), x, widths=(0.5, 1.0))
    with pytest.raises(ValueError, match="not one this model runs at"):
        slim.set_width(0.3)
    with pytest.raises(ValueError, match="not slimmable groups"):
        slim.set_width({999: 0.5})


def test_groups_whose_sizes_are_written_in_the_code_stay_at_full_width():
    model, x = ARCHS["split_chunk"]()
    slim = make_slimmable(model, x)
    assert slim.left_out and all("sizes read in the code" in why for why in slim.left_out.values())
    with slim.at_width(0.25):
        narrow = flat_outputs(run(slim.model, x))
    assert_outputs_close(narrow, flat_outputs(run(export_width(slim, 0.25, x), x)))


def test_per_group_widths_and_round_to():
    model, x = ARCHS["residual_add"]()
    slim = make_slimmable(model, x, widths=WIDTHS, round_to=4)
    first = slim.groups[0].index
    for counts in (slim.keep_counts(0.3), slim.keep_counts({first: 0.3})):
        for g, kept in counts.items():
            sizes = [len(c) for c in slim.classes[g]]
            for k, n in zip(kept, sizes):
                assert k == n or k % 4 == 0, (g, k, n)  # a multiple of 4 channels unless the whole class
    only_first = slim.keep_counts({first: 0.3})
    assert all(k == len(c) for g, ks in only_first.items() if g != first for k, c in zip(ks, slim.classes[g]))
    with slim.at_width({first: 0.3}):
        narrow = [t.clone() for t in flat_outputs(run(slim.model, x))]
    assert_outputs_close(narrow, flat_outputs(run(export_width(slim, {first: 0.3}, x), x)))
    assert slim.macs({first: 0.3}) > slim.macs(0.3)
