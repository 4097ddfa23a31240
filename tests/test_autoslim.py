"""AutoSlim on the search framework: greedy slimming keeps the planted sensitive layer wide,
meets the budget, resumes from its history and hands back an ordinary pruned model; slimmable
checkpoints save and load without pickle."""
from __future__ import annotations

import json

import pytest
import torch

import torchslim
from torchslim.models.digits import DigitsCNN
from torchslim.slimmable import AutoSlimSearch, autoslim, load_slimmable, make_slimmable, save_slimmable

pytestmark = pytest.mark.usefixtures("one_thread")


def _slim(**kwargs):
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 8, 8)
    return make_slimmable(model, x, **{"width_range": (0.25, 1.0), **kwargs}), x


def _planted(model) -> float:
    """Narrowing the first conv costs 10 per lost share, the other layers 1: a known optimum."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hidden = model.classifier[0].out_features
    return -10 * (1 - convs[0].out_channels / 32) - (1 - convs[1].out_channels / 64) - (1 - hidden / 64)


def test_autoslim_narrows_the_insensitive_layers_first_and_meets_the_budget(tmp_path):
    slim, x = _slim()
    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    search = AutoSlimSearch(slim, x, _planted, data=data, target_macs=0.5, history=tmp_path / "h.jsonl")
    result = search.run()
    assert 0.49 <= result.macs / result.original.macs <= 0.5
    assert all(r.macs < result.original.macs for r in search.history.records)  # every candidate is narrower
    first_conv = search.space.keep_counts(result.ratios)[search.slim_groups[0]]
    assert first_conv == search.space.sizes[search.slim_groups[0]]  # the planted sensitive group stays full
    for step in search.steps:
        assert step.after < step.before
    again = AutoSlimSearch(slim, x, _planted, data=data, target_macs=0.5, resume=tmp_path / "h.jsonl").run()
    assert again.ratios == result.ratios and len(again.history) == len(result.history)


def test_autoslim_breaks_equal_scores_by_the_macs_saved():
    """With every candidate scoring the same (a coarse validation accuracy), each step keeps
    the candidate that removes the most MACs, not the lowest group id."""
    slim, x = _slim()
    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    search = AutoSlimSearch(slim, x, lambda model: 0.9, data=data, target_macs=0.5)
    search.run()
    assert len(search.steps) > 1
    for step in search.steps:
        candidates = [r.macs for r in search.history.records if r.note.startswith(f"step {step.index}:")]
        assert len(candidates) > 1 and len(set(candidates)) > 1  # a real choice among different savings
        assert step.after == min(candidates)


def _uniformity(model) -> float:
    """Highest when every layer keeps the same share of its channels (the uniform width)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    shares = [convs[0].out_channels / 32, convs[1].out_channels / 64, model.classifier[0].out_features / 64]
    return -float(torch.tensor(shares).std())


def test_autoslim_returns_the_uniform_width_where_it_scores_above_the_greedy_path():
    slim, x = _slim()
    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    search = AutoSlimSearch(slim, x, _uniformity, data=data, target_macs=0.5)
    result = search.run()
    uniform = search.history.records[-1]
    assert uniform.note == AutoSlimSearch.uniform_note and uniform.meets_budget
    assert search.kept_uniform and result.ratios == uniform.ratios and result.score == uniform.score
    shares = [1 - uniform.ratios.get(g, 0.0) for g in search.slim_groups]
    assert max(shares) - min(shares) < 0.05  # one width for every group, up to channel rounding
    plain = AutoSlimSearch(slim, x, _uniformity, data=data, target_macs=0.5, uniform_baseline=False)
    greedy_end = plain.run()
    assert not plain.kept_uniform and greedy_end.score < uniform.score and greedy_end.ratios != uniform.ratios
    assert [r.ratios for r in plain.history.records] == [r.ratios for r in search.history.records[:-1]]
    planted = AutoSlimSearch(slim, x, _planted, data=data, target_macs=0.5)
    planted.run()  # the greedy path keeps the sensitive first conv full: it beats uniform
    assert planted.history.records[-1].note == AutoSlimSearch.uniform_note and not planted.kept_uniform


def test_autoslim_returns_a_pruned_model_equal_to_the_slimmable_one_at_the_found_widths(tmp_path):
    slim, x = _slim()
    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    batch = torch.randn(4, 1, 8, 8)
    result, model, pruned = autoslim(slim, x, _planted, data=data, target_macs=0.6)
    assert pruned.macs_after == result.macs
    widths = {g: 1 - r for g, r in result.ratios.items()}  # single-class groups: the channels evaluated
    with slim.at_width(widths), torch.no_grad():
        expected = slim(batch)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), expected, atol=1e-5, rtol=1e-5)
    torchslim.save(model, tmp_path / "ck")
    assert torch.equal(torchslim.load(tmp_path / "ck", DigitsCNN().eval())(batch), model(batch))


def test_autoslim_refuses_switchable_batchnorm_and_a_missing_budget_or_data():
    slim, x = _slim(width_range=None, widths=(0.5, 1.0), switchable_bn=True)
    with pytest.raises(ValueError, match="switchable"):
        AutoSlimSearch(slim, x, _planted, data=[x], target_macs=0.5)
    slim, x = _slim()
    with pytest.raises(ValueError, match="needs data"):
        AutoSlimSearch(slim, x, _planted, data=None, target_macs=0.5)
    with pytest.raises(ValueError, match="needs a budget"):
        AutoSlimSearch(slim, x, _planted, data=[x])


@pytest.mark.parametrize("switchable", [False, True])
def test_a_slimmable_checkpoint_loads_into_a_fresh_model_at_every_width(tmp_path, switchable):
    kwargs = {"width_range": None, "widths": (0.5, 1.0), "switchable_bn": True} if switchable else {}
    slim, x = _slim(**kwargs)
    if switchable:
        with torch.no_grad():
            for holder in slim.switchable["0_5"].values():
                holder.running_mean.uniform_(-1, 1)
    batch = torch.randn(4, 1, 8, 8)
    save_slimmable(slim, tmp_path / "s")
    assert torchslim.load(tmp_path / "s", DigitsCNN().eval())  # also an ordinary checkpoint
    loaded = load_slimmable(tmp_path / "s", DigitsCNN().eval(), x)
    assert [g.index for g in loaded.groups] == [g.index for g in slim.groups]
    for width in (0.5, 1.0):
        with slim.at_width(width), loaded.at_width(width), torch.no_grad():
            assert torch.equal(loaded(batch), slim(batch))
    info = json.loads((tmp_path / "s" / "slimmable.json").read_text())
    info["groups"] = [99]
    (tmp_path / "s" / "slimmable.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="do not exist"):
        load_slimmable(tmp_path / "s", DigitsCNN().eval(), x)
    (tmp_path / "s" / "slimmable.json").unlink()
    with pytest.raises(torchslim.CheckpointError, match="not a slimmable checkpoint"):
        load_slimmable(tmp_path / "s", DigitsCNN().eval(), x)
