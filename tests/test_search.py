"""Automatic pruning searches (torchslim.search): the shared loop, sensitivity analysis and
the methods built on it, checked with synthetic evaluators whose optimum is known: the score
is a function of the per-layer widths of the pruned model."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from torchslim.graph.macs import estimate_macs
from torchslim.search import SearchInterrupted, SearchWarning
from torchslim.search.base import Search
from torchslim.search.history import read_history

WIDTHS = (32, 48, 64, 40)


class Net(nn.Module):
    """Four conv layers (each its own group) and a linear head."""

    def __init__(self):
        super().__init__()
        chans = (3, *WIDTHS)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Linear(WIDTHS[-1], 10)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 3, 16, 16),)


def widths(model: Net) -> list[int]:
    return [conv.weight.shape[0] for conv in model.convs]


def width_score(weights):
    """A score that is a known function of each layer's kept share: -sum w_i * removed_i^2."""
    def evaluate(model):
        kept = np.array(widths(model)) / np.array(WIDTHS)
        return float(-np.sum(np.asarray(weights) * (1 - kept) ** 2))
    return evaluate


class RandomProposals(Search):
    """A minimal method: ``n`` random per-group ratios from the search's seed."""

    method = "random-test"

    def __init__(self, *args, n=6, **kwargs):
        super().__init__(*args, **kwargs)
        self.n = n

    def options(self):
        return {"n": self.n}

    def explore(self):
        groups = sorted(self.space.sizes)
        for _ in range(self.n):
            self.evaluate_ratios({g: float(self.rng.uniform(0.0, 0.9)) for g in groups})


def _macs(model, x):
    return estimate_macs(torchslim.DependencyGraph.build(model, x))


# the loop -----------------------------------------------------------------------------
def test_every_candidate_meets_the_budget_and_the_winner_applies_as_evaluated(tmp_path):
    model, x = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate = width_score([1.0, 2.0, 3.0, 4.0])
    search = RandomProposals(model, x, evaluate, target_macs=0.5, seed=3, history=tmp_path / "h.jsonl")
    result = search.run()
    original = _macs(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched until apply_
    assert len(result.history) == 6
    for record in result.history:
        assert record.meets_budget and record.macs <= 0.5 * original
        assert record.macs >= 0.5 * original * 0.98, record  # met exactly, within 2% under
    assert result.score == max(r.score for r in result.history)
    assert set(result.config.ratios) == set(result.ratios) and result.config.target is None
    pruned = result.apply_(model, x)
    assert pruned.macs_after == result.macs == _macs(model, x)
    assert evaluate(model) == pytest.approx(result.score)


def test_history_is_json_lines_one_record_per_evaluation(tmp_path):
    model, x = _net()
    path = tmp_path / "h.jsonl"
    RandomProposals(model, x, width_score([1, 1, 1, 1]), target_params=0.6, n=3, history=path).run()
    lines = path.read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header["format"] == "torchslim.search/1" and header["target"] == {"target_params": 0.6}
    assert len(records) == 3
    assert {"ratios", "macs", "params", "score", "seconds", "latency_ms"} <= set(records[0])


def test_resume_after_the_evaluator_raised_equals_an_uninterrupted_run(tmp_path):
    model, x = _net()
    evaluate = width_score([4.0, 1.0, 3.0, 0.5])
    full = RandomProposals(model, x, evaluate, target_macs=0.4, seed=7, n=8).run()

    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("lost the GPU")
        return evaluate(m)

    path = tmp_path / "h.jsonl"
    with pytest.raises(SearchInterrupted, match=r"resume=") as info:
        RandomProposals(model, x, flaky, target_macs=0.4, seed=7, n=8, history=path).run()
    assert len(info.value.records) == 3 and len(read_history(path)[1]) == 3
    counted = {"n": 0}

    def counting(m):
        counted["n"] += 1
        return evaluate(m)

    resumed = RandomProposals(model, x, counting, target_macs=0.4, seed=7, n=8, resume=path).run()
    assert counted["n"] == 5  # the 3 recorded evaluations were replayed, not re-run
    assert resumed.ratios == full.ratios and resumed.score == full.score
    assert [r.ratios for r in resumed.history] == [r.ratios for r in full.history]
    assert len(read_history(path)[1]) == 8


def test_resume_refuses_another_search(tmp_path):
    model, x = _net()
    path = tmp_path / "h.jsonl"
    RandomProposals(model, x, width_score([1, 1, 1, 1]), target_macs=0.4, seed=1, n=2, history=path).run()
    with pytest.raises(ValueError, match="seed"):
        RandomProposals(model, x, width_score([1, 1, 1, 1]), target_macs=0.4, seed=2, n=2, resume=path).run()


def test_nan_scores_count_as_worst_with_a_warning():
    model, x = _net()
    evaluate = width_score([1, 1, 1, 1])
    calls = {"n": 0}

    def sometimes_nan(m):
        calls["n"] += 1
        return math.nan if calls["n"] % 2 else evaluate(m)

    with pytest.warns(SearchWarning, match="nan.*worst"):
        result = RandomProposals(model, x, sometimes_nan, target_macs=0.5, n=4).run()
    assert [r.score == -math.inf for r in result.history] == [True, False, True, False]
    assert math.isfinite(result.score)


def test_unreachable_budget_is_refused_before_any_evaluation():
    model, x = _net()
    calls = []
    with pytest.raises(ValueError, match=r"target_macs=0.001 cannot be met.*smallest reachable macs is \d+"):
        RandomProposals(model, x, lambda m: calls.append(1) or 0.0, target_macs=0.001).run()
    assert not calls


def test_max_evals_and_finetune_on_a_copy():
    model, x = _net()
    seen = []

    def finetune(m, budget):
        seen.append(budget)
        with torch.no_grad():
            m.head.bias.fill_(7.0)  # never sliced: would stay in the working copy if it were not a copy

    search = RandomProposals(model, x, width_score([1, 1, 1, 1]), target_macs=0.5, n=10, max_evals=3,
                             finetune=finetune, finetune_budget=5)
    result = search.run()
    assert result.stopped == "max_evals" and len(result.history) == 3 and seen == [5, 5, 5]
    assert not (search.working.head.bias == 7.0).any() and not (model.head.bias == 7.0).any()


# sensitivity ---------------------------------------------------------------------------
# convs.1 and convs.3 are planted insensitive: the score hardly moves when they are pruned
PLANTED = [5.0, 0.01, 4.0, 0.02]


def _group_of(analysis, module):
    return next(g for g, label in analysis.labels.items() if module in label.split(", "))


def test_sensitivity_finds_the_planted_insensitive_groups_and_meets_the_budget(tmp_path):
    from torchslim.search import SensitivitySearch

    model, x = _net()
    search = SensitivitySearch(model, x, width_score(PLANTED), target_macs=0.5, history=tmp_path / "h.jsonl")
    result = search.run()
    analysis = search.analysis
    assert len(result.history) == 1 + 4 * 9 + 1
    insensitive = {_group_of(analysis, "convs.1"), _group_of(analysis, "convs.3")}
    assert set(analysis.most_sensitive()[-2:]) == insensitive
    original = search.space.original.macs
    assert 0.485 * original <= result.macs <= 0.5 * original
    sensitive = {_group_of(analysis, "convs.0"), _group_of(analysis, "convs.2")}
    assert min(result.ratios.get(g, 0.0) for g in insensitive) > max(result.ratios.get(g, 0.0) for g in sensitive)
    # better than cutting every group alike to the same budget
    uniform = search.space.meet_budget({g: 0.5 for g in search.space.sizes})
    with torchslim.pruning.applied(search.space.graph, search.space.removal(uniform)):
        uniform_score = width_score(PLANTED)(search.working)
    assert result.score > uniform_score
    pruned = result.apply_(model, x)
    assert pruned.macs_after == result.macs


def test_a_saved_analysis_re_searches_a_new_budget_without_evaluating(tmp_path):
    import time

    from torchslim.search import SensitivityAnalysis, SensitivitySearch

    model, x = _net()
    analysis = SensitivitySearch(model, x, width_score(PLANTED)).analyze()
    path = analysis.save(tmp_path / "sensitivity.json")
    loaded = SensitivityAnalysis.load(path)
    assert loaded == analysis
    start = time.perf_counter()
    config = loaded.choose_for(model, x, target_macs=0.3)
    assert time.perf_counter() - start < 5.0
    original = _macs(model, x)
    result = torchslim.prune_(model, x, config)
    assert 0.28 * original <= result.macs_after <= 0.3 * original
    kept = np.array(widths(model)) / np.array(WIDTHS)
    assert kept[1] < kept[0] and kept[3] < kept[2]  # the insensitive layers gave the most


def test_sensitivity_table_json_and_plot(tmp_path, monkeypatch):
    import sys

    from rich.console import Console

    from torchslim.search import SensitivitySearch

    model, x = _net()
    analysis = SensitivitySearch(model, x, width_score(PLANTED)).analyze()
    console = Console(record=True, width=200)
    console.print(analysis.table())
    text = console.export_text()
    assert "convs.0" in text and "0.9" in text
    assert analysis.plot(tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.warns(SearchWarning, match="matplotlib is not installed"):
        assert analysis.plot(tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()


def test_sensitivity_refuses_too_few_evaluations():
    from torchslim.search import SensitivitySearch

    model, x = _net()
    with pytest.raises(ValueError, match="needs 38 evaluations"):
        SensitivitySearch(model, x, width_score(PLANTED), target_macs=0.5, max_evals=10).run()


# simulated annealing and NetAdapt -------------------------------------------------------
# the largest layers (convs.2, convs.3) planted insensitive, so NNI's size order (the largest
# layer gets the largest ratio) can reach the optimum: a score of 0 minus what the small
# layers must give (the sensitivity search scores about -0.006 here)
BY_SIZE = [5.0, 4.0, 0.01, 0.02]


def test_annealing_gets_near_the_optimum_in_few_evaluations():
    from torchslim.search import AnnealingSearch

    model, x = _net()
    for seed in (0, 1, 2):
        search = AnnealingSearch(model, x, width_score(BY_SIZE), target_macs=0.5, seed=seed)
        result = search.run()
        assert len(result.history) == 17  # 100 -> 20 at 0.9 per step: 16 steps + the initial candidate
        original = search.space.original.macs
        assert all(0.485 * original <= r.macs <= 0.5 * original for r in result.history)
        # the optimum is in [-0.006, 0] (seeds 0..3 measured -0.004, -0.006, -0.09, -0.14); all alike: -0.8
        assert result.score >= -0.15
    uniform = search.space.meet_budget({g: 0.5 for g in search.space.sizes})
    with torchslim.pruning.applied(search.space.graph, search.space.removal(uniform)):
        assert width_score(BY_SIZE)(search.working) < -0.5


def test_netadapt_cuts_at_least_the_schedule_every_iteration():
    from torchslim.search import NetAdaptSearch

    model, x = _net()
    search = NetAdaptSearch(model, x, width_score(PLANTED), target_macs=0.5, initial_cut=0.08, decay=0.9)
    result = search.run()
    original = search.space.original.macs
    budget = 0.5 * original
    assert len(search.iterations) >= 3
    for it in search.iterations:
        assert it.before - it.after >= it.scheduled or it.after <= budget >= it.before - it.scheduled, it
        assert it.scheduled == pytest.approx(0.08 * original * 0.9 ** it.index)
    assert search.iterations[-1].after <= budget < search.iterations[-2].after
    for record in result.history:  # every proposal of iteration k meets that iteration's bound
        k = int(record.note.split(":")[0].split()[1])
        assert record.macs <= search.iterations[k].bound
    assert result.macs <= budget and result.score > -0.1
    assert {search.iterations[i].group for i in range(len(search.iterations))} <= {
        _group_of(SimpleLabels(search), "convs.1"), _group_of(SimpleLabels(search), "convs.3")}
    assert result.apply_(model, x).macs_after == result.macs


class SimpleLabels:
    def __init__(self, search):
        from torchslim.search.sensitivity import group_label

        self.labels = {g.index: group_label(g) for g in search.space.groups}


# resume, data, latency -----------------------------------------------------------------
def test_annealing_killed_mid_search_resumes_to_the_same_result(tmp_path):
    from torchslim.search import AnnealingSearch

    model, x = _net()
    evaluate = width_score(BY_SIZE)
    full = AnnealingSearch(model, x, evaluate, target_macs=0.5, seed=1).run()
    path = tmp_path / "sa.jsonl"
    calls = {"n": 0}

    def dies_at_six(m):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyError("worker killed")
        return evaluate(m)

    with pytest.raises(SearchInterrupted, match="evaluation 5 raised KeyError"):
        AnnealingSearch(model, x, dies_at_six, target_macs=0.5, seed=1, history=path).run()
    with open(path, "a") as handle:  # killed while writing the next line
        handle.write('{"index": 5, "ratios": {"0": 0.')
    resumed = AnnealingSearch(model, x, evaluate, target_macs=0.5, seed=1, resume=path).run()
    assert (resumed.ratios, resumed.score) == (full.ratios, full.score)
    assert [r.score for r in resumed.history] == [r.score for r in full.history]


def test_recalibrate_bn_and_data_driven_criterion_work_on_copies():
    from torchslim.search import AnnealingSearch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    x = (torch.randn(2, 3, 12, 12),)
    batches = [torch.randn(4, 3, 12, 12) * 3 + 1 for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    means = []

    def evaluate(m):
        means.append(float(m[1].running_mean.abs().sum()))
        with torch.no_grad():
            return -float(m(x[0]).square().mean())

    search = AnnealingSearch(model, x, evaluate, target_params=0.6, criterion="mean_activation", data=batches,
                             recalibrate_bn=True, start_temperature=30.0)
    result = search.run()
    assert all(m > 0.5 for m in means)  # recalibrated on the batches (the fresh BN had zero means)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert float(search.working[1].running_mean.abs().sum()) == 0.0  # recalibration happened on copies
    assert result.apply_(model, x).params_after == result.params  # apply_ ranks with the same data


def test_netadapt_under_a_latency_budget_cuts_the_predicted_latency_per_schedule(tmp_path, monkeypatch):
    from torchslim.latency import LatencyTable
    from torchslim.search import NetAdaptSearch

    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))
    # a deterministic per-layer table (cost ~ cin x cout), so the test does not time layers
    monkeypatch.setattr(LatencyTable, "_measure", lambda self, spec, cin, cout: 1e-3 * cin * cout)
    model, x = _net()
    search = NetAdaptSearch(model, x, width_score(PLANTED), target_latency=0.7, initial_cut=0.1, decay=0.8,
                            measure_latency=False)
    result = search.run()
    original = search.space.original.latency_ms
    for it in search.iterations:
        assert it.before - it.after >= it.scheduled or it.after <= 0.7 * original
    assert result.latency_ms <= 0.7 * original and result.history[-1].latency_ms is not None


def test_time_limit_stops_with_the_best_so_far():
    import time

    model, x = _net()
    evaluate = width_score(PLANTED)

    def slow(m):
        time.sleep(0.2)
        return evaluate(m)

    result = RandomProposals(model, x, slow, target_macs=0.5, n=50, time_limit=0.5).run()
    assert result.stopped == "time_limit" and 1 <= len(result.history) <= 4


def test_ranking_settings_of_the_users_config_do_not_reach_the_result():
    """Per-group ratios leave global or latency-aware ranking nothing to decide; were they kept,
    the returned config would prune by one global ranking instead of the ratios evaluated."""
    model, x = _net()
    config = torchslim.PruneConfig(global_ranking=True, criterion="l2")
    result = RandomProposals(model, x, width_score([1, 2, 3, 4]), target_macs=0.5, n=3, config=config).run()
    assert result.config.global_ranking is False and result.config.latency_aware is False
    assert result.config.criterion == "l2"
    before = _macs(model, x)
    result.apply_(model, x)
    assert _macs(model, x) == result.macs <= 0.5 * before


def test_round_to_latency_is_refused_with_the_reason():
    model, x = _net()
    with pytest.raises(ValueError, match="round_to='latency' cannot be searched"):
        RandomProposals(model, x, width_score([1, 1, 1, 1]), target_macs=0.5,
                        config=torchslim.PruneConfig(round_to="latency"))


class Normed(nn.Module):
    """conv -> LayerNorm over channels -> conv: the first conv's group is inexact."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 32, 1), nn.LayerNorm(32), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = self.norm(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.b(y)


def test_unreachable_budget_names_the_inexact_groups_left_out():
    model, x = Normed().eval(), (torch.randn(1, 3, 8, 8),)
    search = RandomProposals(model, x, lambda m: 0.0, target_macs=0.5)
    with pytest.raises(ValueError, match=r"1 inexact group\(s\) were left out \(a, b, norm\): exact_only=False"):
        search.run()
    relaxed = RandomProposals(model, x, lambda m: 0.0, target_macs=0.5, n=1,
                              config=torchslim.PruneConfig(exact_only=False)).run()
    assert relaxed.macs <= 0.5 * _macs(model, x)


def test_netadapt_halves_a_cut_no_single_group_can_make():
    """90% of the MACs in one group is more than any group of this net holds: the iteration's
    cut is halved until one can, recorded, and the loop still reaches the budget."""
    from torchslim.search import NetAdaptSearch

    model, x = _net()
    search = NetAdaptSearch(model, x, width_score(PLANTED), target_macs=0.1, initial_cut=0.9, decay=1.0)
    result = search.run()
    original = search.space.original.macs
    first = search.iterations[0]
    assert first.halved >= 1 and first.scheduled == pytest.approx(0.9 * original / 2 ** first.halved)
    for it in search.iterations:
        assert it.before - it.after >= it.scheduled or it.after <= 0.1 * original, it
    assert result.macs <= 0.1 * original


def test_netadapt_lowers_the_tables_goal_when_the_result_measures_slower(tmp_path, monkeypatch):
    """The table times layers alone; a result that measures 25% over its prediction makes the
    search lower its goal by that excess and continue; resuming replays the measurement."""
    from torchslim.latency import LatencyTable
    from torchslim.search import NetAdaptSearch

    monkeypatch.setenv("TORCHSLIM_CACHE", str(tmp_path))
    monkeypatch.setattr(LatencyTable, "_measure", lambda self, spec, cin, cout: 1e-3 * cin * cout)
    timed = []

    def measured_share(self, ratios):  # the machine: 25% slower than the table says, for any pruned model
        timed.append(dict(ratios))
        return min(1.0, 1.25 * self.resource(ratios) / self.space.original.latency_ms)

    monkeypatch.setattr(NetAdaptSearch, "measured_share", measured_share)
    model, x = _net()
    kwargs = dict(target_latency=0.6, initial_cut=0.05, decay=1.0, history=tmp_path / "h.jsonl")
    search = NetAdaptSearch(model, x, width_score(PLANTED), **kwargs)
    result = search.run()
    original = search.space.original.latency_ms
    shares = [c["measured_share"] for c in search.calibration]
    assert shares[0] > 0.6 * 1.04 and shares[-1] <= 0.6 * 1.04  # over the target, then within tolerance
    assert result.latency_ms <= 0.6 / 1.25 * original * 1.04
    assert result.latency_ms == search.space.measure(result.ratios).latency_ms
    calls = len(timed)
    kwargs["resume"] = kwargs.pop("history")
    again = NetAdaptSearch(model, x, width_score(PLANTED), **kwargs).run()
    assert len(timed) == calls and again.ratios == result.ratios  # replayed, not timed again


# searching again on a pruned model ----------------------------------------------------
def _thinned():
    """``Net`` and a copy pruned to half of every layer, ``convs.0`` further to 1 of 32 (3%)."""
    model, x = _net()
    pruned = copy.deepcopy(model)
    torchslim.prune_(pruned, x, torchslim.PruneConfig(ratios={"convs.0": 0.97, "convs.[123]": 0.5},
                                                      latency_aware=False))
    return model, pruned, x


def _original_width(space, group) -> int:
    """The reference width of a group of ``Net``: its conv's filters in WIDTHS."""
    name = next(n for n, d in group.params if n.startswith("convs.") and d == 0)
    return WIDTHS[int(name.split(".")[1])]


def test_caps_count_from_the_reference_width_so_searches_do_not_compound():
    model, pruned, x = _thinned()
    assert widths(pruned) == [1, 24, 32, 20]
    from torchslim.search._space import SearchSpace

    plain = SearchSpace(copy.deepcopy(pruned), x, torchslim.PruneConfig(target_macs=0.5))
    capped = SearchSpace(copy.deepcopy(pruned), x, torchslim.PruneConfig(target_macs=0.5), reference=model)
    for group in capped.groups:
        now, original = len(group), _original_width(capped, group)
        assert capped.cap(group.index) == pytest.approx(max(0.0, 1 - 0.05 * original / now))
        assert plain.cap(group.index) == pytest.approx(0.95)
        # at the most a search removes, a group keeps 5% of its reference width (convs.0 already has less: all)
        assert capped.keep_counts(capped.most_removed())[group.index] >= min(now, 0.05 * original)
        for u in (0.3, 1.0, 1.5, 2.0):
            assert capped.scaled({group.index: 0.9}, u)[group.index] <= capped.cap(group.index) + 1e-12
    thinnest = [g for g in capped.groups if len(g) == 24][0]  # convs.1: 24 of 48 left, may lose 21 more
    assert plain.keep_counts(plain.most_removed())[thinnest.index] < 0.05 * 48
    assert capped.describe()["caps"] and "caps" not in plain.describe()


@pytest.mark.parametrize("method", ["annealing", "amc", "netadapt"])
def test_every_method_keeps_each_group_at_5_percent_of_its_reference_width(method):
    from torchslim.search import AMCSearch, AnnealingSearch, NetAdaptSearch

    model, pruned, x = _thinned()
    kwargs = {"annealing": dict(cls=AnnealingSearch, max_evals=6),
              "amc": dict(cls=AMCSearch, episodes=4, warmup=2),
              "netadapt": dict(cls=NetAdaptSearch, initial_cut=0.3, max_iterations=6)}[method]
    cls = kwargs.pop("cls")
    search = cls(pruned, x, width_score([1, 2, 3, 4]), target_macs=0.15, reference=model, seed=1, **kwargs)
    result = search.run()
    assert result.history
    for record in result.history:
        keep = search.space.keep_counts(record.ratios)
        for group in search.space.groups:
            assert keep[group.index] >= min(len(group), 0.05 * _original_width(search.space, group)), (method, record)
    before = widths(pruned)
    result.apply_(pruned, x)
    assert all(w >= min(b, 0.05 * o) for w, b, o in zip(widths(pruned), before, WIDTHS))
    assert widths(pruned) != before
