"""Which atoms get selected: settings that match or allow nothing are refused or named, and
``ratios`` means the same under every target."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from torchslim.pruning.selector import NothingPrunedWarning


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


X = torch.randn(1, 3, 8, 8)


def _state(model):
    return copy.deepcopy(model.state_dict())


def _unchanged(model, state) -> bool:
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_ratio_pattern_matching_no_module_is_refused_naming_it():
    model = Three()
    state = _state(model)
    with pytest.raises(ValueError, match=r"PruneConfig\.ratios\['nothing'\] matches no module of Three"):
        torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5, ratios={"nothing": 0.5}))
    assert _unchanged(model, state)


@pytest.mark.parametrize("key", [True, 1.5])
def test_ratio_key_neither_glob_nor_group_id_is_refused_naming_it(key):
    model = Three()
    state = _state(model)
    with pytest.raises(TypeError, match=rf"PruneConfig\.ratios\[{key!r}\]: keys are module globs \(str\) or group ids"):
        torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5, ratios={key: 0.5}))
    assert _unchanged(model, state)


@pytest.mark.parametrize("kwargs,needle", [
    ({"round_to": 1000}, r"PruneConfig\.round_to=1000 keeps every channel"),
    ({"min_channels": 10000}, r"PruneConfig\.min_channels=10000 keeps every channel"),
    ({"ratios": {"*": 0.0}}, r"PruneConfig\.ratios=\{'\*': 0\.0\} keeps every channel"),
    ({"exclude": ["a", "b", "c"]}, r"PruneConfig\.exclude leaves none of the model's 3 prunable groups"),
    ({"ratio": 0.01}, r"PruneConfig\.ratio=0\.01 is less than one channel"),
    ({"target_macs": 1.0}, r"PruneConfig\.target_macs=1\.0 is already met"),
])
def test_a_setting_that_prevents_every_removal_is_named_in_a_warning(kwargs, needle):
    model = Three()
    state = _state(model)
    with pytest.warns(NothingPrunedWarning, match=needle):
        result = torchslim.prune_(model, X, torchslim.PruneConfig(**kwargs))
    assert result.groups_pruned == 0 and _unchanged(model, state)


def test_a_model_with_nothing_prunable_says_so():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()  # its only channels are the model's outputs
    weight = model[0].weight.detach().clone()
    with pytest.warns(NothingPrunedWarning, match="no channel of the model can be pruned"):
        result = torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5))
    assert result.groups_pruned == 0 and not result.plan.steps
    assert model[0].out_channels == 4 and torch.equal(model[0].weight, weight)


def test_a_removal_gives_no_nothing_pruned_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingPrunedWarning)
        result = torchslim.prune_(Three(), X, torchslim.PruneConfig(ratio=0.5, round_to=8))
    assert result.groups_pruned == 3


class _LatencyOfAtoms:
    """A stand-in latency table: every prunable atom costs 1 ms, the rest of the model as much as
    all of them together (so targets are met without timing)."""

    def __init__(self, graph):
        self.cost = (graph.atom_group >= 0).astype(float)
        self.measured_ms = 2 * float(self.cost.sum())

    def predict(self, removed=None):
        gone = self.cost[np.asarray(removed, dtype=np.int64)].sum() if removed is not None else 0.0
        return float(self.measured_ms - gone)


def _removed_per_module(config, ranking):
    """Channels of a, b, c removed by the selection ``config`` describes (the same spread of
    importance in every group, so that a global ranking takes from each)."""
    from torchslim.graph import DependencyGraph
    from torchslim.pruning.selector import Selector, eligible_groups

    config = dataclasses.replace(config, latency_aware=False)  # ranking set below, widths and caps as given
    graph = DependencyGraph.build(Three(), X)
    groups = eligible_groups(graph, config)
    scores = {g.index: np.arange(1.0, len(g) + 1) for g in groups}
    selector = Selector(graph, groups, scores, config, _LatencyOfAtoms(graph))
    selector = selector.choosing(ranking=ranking)
    _, removed = selector.select(np.zeros(graph.n_atoms, dtype=bool))
    return [int(np.isin(graph.module_output_atoms(name), removed).sum()) for name in ("a", "b", "c")]


@pytest.mark.parametrize("target", [{"target_macs": 0.85}, {"target_params": 0.85}, {"target_latency": 0.85}])
@pytest.mark.parametrize("ranking", ["per_group", "global"])
def test_ratios_bound_a_group_under_every_target(target, ranking):
    """ratios={"b": 0.5}: b may lose up to half its channels. A mild target needs less than that
    of every group, so b loses what the search gives the others, never a fixed half."""
    free = _removed_per_module(torchslim.PruneConfig(**target), ranking)
    bounded = _removed_per_module(torchslim.PruneConfig(ratios={"b": 0.5}, **target), ranking)
    assert bounded == free and 0 < bounded[1] < 8, (free, bounded)
    tight = _removed_per_module(torchslim.PruneConfig(ratios={"b": 0.0625}, **target), ranking)
    assert tight[1] <= 1 and tight[0] + tight[2] >= free[0] + free[2], tight  # b stops at 1 channel, others pay


def test_ratios_bound_a_group_under_global_ranking_without_a_target():
    model = Three()
    with torch.no_grad():
        model.a.weight.mul_(0.01)  # a ranks lowest, so global ranking would take most of it
    torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.3, global_ranking=True, ratios={"a": 0.25}))
    assert model.a.out_channels >= 12 and model.b.out_channels + model.c.out_channels < 32


# exact groups first (exact_only=None) ------------------------------------------------------
def _causal_lm(kind: str):
    transformers = pytest.importorskip("transformers")
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=100)
    if kind == "gpt2":
        sizes = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(kind, **sizes)).eval()
    return model, torch.randint(0, 100, (1, 16))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_default_target_is_met_with_exact_groups_when_they_suffice(kind):
    """Pruning the hidden size (RMSNorm/LayerNorm statistics) is not needed for half the MACs:
    the default leaves it, so the result equals the zeroed original."""
    from torchslim.pruning.selector import InexactGroupsWarning

    model, ids = _causal_lm(kind)
    original = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InexactGroupsWarning)
        result = torchslim.prune_(model, ids, torchslim.PruneConfig(target_macs=0.5))
    assert result.macs_after <= 0.5 * result.macs_before
    assert torchslim.verify(original, model, ids, result.plan).ok
    assert model.lm_head.in_features == original.lm_head.in_features


def test_default_target_adds_inexact_groups_only_when_needed_and_says_so():
    from torchslim.pruning.selector import InexactGroupsWarning

    model, ids = _causal_lm("llama")
    with pytest.raises(ValueError, match=r"target_macs=0\.2 cannot be met"):
        torchslim.prune_(copy.deepcopy(model), ids, torchslim.PruneConfig(target_macs=0.2, exact_only=True))
    with pytest.warns(InexactGroupsWarning, match=r"target_macs=0\.2 cannot be met with exact groups alone.*norm"):
        result = torchslim.prune_(model, ids, torchslim.PruneConfig(target_macs=0.2))
    assert result.macs_after <= 0.2 * result.macs_before and model.lm_head.in_features < 64


def test_default_ratio_prunes_exact_groups_and_counts_the_inexact_ones_left():
    from torchslim.pruning.selector import InexactGroupsWarning

    model, ids = _causal_lm("llama")
    original = copy.deepcopy(model)
    with pytest.warns(InexactGroupsWarning, match=r"1 inexact group\(s\) left unpruned.*exact_only=False"):
        result = torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5))
    assert result.plan and torchslim.verify(original, model, ids, result.plan).ok
    assert model.lm_head.in_features == 64
    torchslim.prune_(original, ids, torchslim.PruneConfig(ratio=0.5, exact_only=False))  # today's meaning of False
    assert original.lm_head.in_features == 32


# targets land on the target ----------------------------------------------------------------
def _hf_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model("vit", hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                                               intermediate_size=384, image_size=64, patch_size=8)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval(), torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize("round_to", [1, 8])
def test_target_macs_lands_within_2_percent_where_heads_step_in_every_block_at_once(round_to):
    """With 3 heads per block, the ratio search drops a third of every block's attention at one
    ratio (1/3). A target in the middle of that step is reached with finer atoms (FFN units),
    not overshot by the whole step; widths stay multiples of round_to."""
    from torchslim.graph import DependencyGraph
    from torchslim.graph.macs import estimate_macs
    from torchslim.pruning.selector import Selector, eligible_groups

    model, x = _hf_vit()
    graph = DependencyGraph.build(model, x)
    config = torchslim.PruneConfig(target_macs=0.5, exact_only=True, round_to=round_to, latency_aware=False)
    groups = eligible_groups(graph, config)
    heads = [g for g in groups if graph.atom_width(g) == 32]
    assert len(heads) == 2 and all(len(g) == 3 for g in heads)
    selector = Selector(graph, groups, {g.index: np.arange(1.0, len(g) + 1) for g in groups}, config)
    nothing = np.zeros(graph.n_atoms, dtype=bool)
    before, after = (estimate_macs(graph, selector.remove_at(r, nothing)) / selector.macs_before
                     for r in (1 / 3 - 1e-3, 1 / 3 + 1e-3))
    target = (before + after) / 2
    assert after < 0.96 * target  # the step is coarse: stopping at the ratio that meets the target overshoots
    result = torchslim.prune_(model, x, torchslim.PruneConfig(target_macs=target, exact_only=True, round_to=round_to,
                                                              latency_aware=False))
    assert 0.98 * target <= result.macs_after / result.macs_before <= target
    assert all(layer.mlp.fc1.out_features % round_to == 0 for layer in model.layers)


# the default MACs target goes where the time is ----------------------------------------------
class HighAndLowResolution(nn.Module):
    """Two thin layers at 64x64 (memory-bound: each channel moves 4096 elements per tensor) and
    two wide ones at 8x8 (compute-bound): per channel, comparable MACs, very different time."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 1)
        self.c = nn.Conv2d(32, 256, 3, padding=1)
        self.d = nn.Conv2d(256, 256, 3, padding=1)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        x = nn.functional.max_pool2d(x, 8)
        x = torch.relu(self.d(torch.relu(self.c(x))))
        return self.head(x.mean((2, 3)))


X64 = torch.randn(1, 3, 64, 64)


def _estimated_ms(model) -> float:
    from torchslim.graph import DependencyGraph
    from torchslim.latency.lut import CostModel

    return CostModel(DependencyGraph.build(model, X64)).unpruned_ms


def test_default_macs_target_cuts_where_the_estimated_time_is_with_hardware_widths(monkeypatch):
    """No table is measured (the default must not need one): the thin high-resolution layers
    lose channels first, at most 60% of them, in multiples of 8; cutting every group alike
    leaves more estimated time at the same MACs."""
    from torchslim.latency import lut

    def no_measurement(*args, **kwargs):
        raise AssertionError("the default MACs target measured latency")

    monkeypatch.setattr(lut.LatencyTable, "lookup", no_measurement)
    monkeypatch.setattr(lut, "measure_model", no_measurement)
    default, alike = HighAndLowResolution().eval(), HighAndLowResolution().eval()
    original = copy.deepcopy(default)
    result = torchslim.prune_(default, X64, torchslim.PruneConfig(target_macs=0.6))
    torchslim.prune_(alike, X64, torchslim.PruneConfig(target_macs=0.6, latency_aware=False))
    assert 0.95 * 0.6 <= result.macs_after / result.macs_before <= 0.6  # steps of 8 channels are 2% each here
    assert torchslim.verify(original, default, X64, result.plan).ok
    widths = [default.a.out_channels, default.b.out_channels, default.c.out_channels]
    assert all(w % 8 == 0 for w in widths) and min(widths[:2]) >= 16, widths  # 60% at most of 32
    assert default.a.out_channels + default.b.out_channels < alike.a.out_channels + alike.b.out_channels
    assert _estimated_ms(default) < 0.9 * _estimated_ms(alike), (_estimated_ms(default), _estimated_ms(alike))


def test_default_cap_counts_against_the_width_before_any_pruning():
    """Pruned in steps with the default MACs ranking, no group ends thinner than one prune
    could leave it (40% of its width as built, in multiples of 8): the thin high-resolution
    layers the ranking cuts first stop at 16 of 32 channels while the wide ones pay the rest."""
    model = HighAndLowResolution().eval()
    original = copy.deepcopy(model)
    macs = []
    for _ in range(3):
        result = torchslim.prune_(model, X64, torchslim.PruneConfig(target_macs=0.8))
        assert result.macs_after <= 0.8 * result.macs_before
        macs.append(result.macs_after)
    assert model.a.out_channels >= 16 and model.b.out_channels >= 16, (model.a.out_channels, model.b.out_channels)
    assert model.c.out_channels < 256  # the rest of the budget came from the wide layers
    assert torchslim.verify(original, model, X64, torchslim.pruning_history(model)).ok


def test_cost_model_charges_memory_traffic_depthwise_and_thin_products():
    """The shape-based estimate behind the default ranking: a depthwise MAC costs several dense
    ones, elementwise ops cost their traffic, and thin products cost more per MAC."""
    from torchslim.graph import DependencyGraph
    from torchslim.latency.lut import CostModel

    def estimate(model, x):
        return CostModel(DependencyGraph.build(model.eval(), x)).unpruned_ms

    x = torch.randn(1, 64, 32, 32)
    dense, depthwise = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.Conv2d(64, 64, 3, padding=1, groups=64)
    per_mac_dense = estimate(nn.Sequential(dense), x) / (64 * 64 * 9 * 1024)
    per_mac_depthwise = estimate(nn.Sequential(depthwise), x) / (64 * 9 * 1024)
    assert per_mac_depthwise > 3 * per_mac_dense  # depthwise convs are memory-bound
    relu_only = estimate(nn.Sequential(nn.ReLU()), x)
    assert relu_only > 2 * estimate(nn.Sequential(nn.ReLU()), torch.randn(1, 64, 8, 8))  # elementwise traffic
    rows = torch.randn(256, 4096)  # nearly the same traffic either way (the 4096 inputs per row)
    thin, wider = (estimate(nn.Sequential(nn.Linear(4096, n, bias=False)), rows) for n in (8, 16))
    assert thin > 0.75 * wider  # half the MACs, yet more than 3/4 of the time (0.72 if MACs cost alike)
