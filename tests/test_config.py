"""Config features: global ranking with per-layer caps, targets, per-module ratios, input
protection, NNI-style rule lists, and validation that fails before anything changes."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from torchslim.pruning import config_from_recipe


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 2, 1)
        with torch.no_grad():
            self.a.weight.mul_(0.01)  # a's channels look unimportant to a global ranking

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


X = torch.randn(1, 3, 8, 8)


def test_global_ranking_takes_unevenly_but_respects_the_cap():
    free = Three()
    torchslim.prune_(free, X, torchslim.PruneConfig(ratio=0.3, global_ranking=True, criterion="l1"))
    assert free.a.out_channels < free.b.out_channels  # the small layer pays most
    capped = Three()
    torchslim.prune_(capped, X, torchslim.PruneConfig(ratio=0.3, global_ranking=True, max_sparsity_per_layer=0.25))
    assert min(capped.a.out_channels, capped.b.out_channels, capped.c.out_channels) >= 12
    assert capped.a.out_channels + capped.b.out_channels + capped.c.out_channels <= 48 - 12


def test_target_params_is_met():
    model = Three()
    before = sum(p.numel() for p in model.parameters())
    result = torchslim.prune_(model, X, torchslim.PruneConfig(target_params=0.5))
    assert result.params_after == sum(p.numel() for p in model.parameters()) <= 0.5 * before


def _removed_importance(global_ranking: bool) -> tuple[float, Three]:
    """Prune Three to half its MACs; return the removed atoms' importance (l1, divided by their
    group's mean, as global ranking compares groups) and the pruned model."""
    import numpy as np

    from torchslim.criteria import make_importance
    from torchslim.graph import DependencyGraph

    model = Three()
    graph = DependencyGraph.build(model, X)
    importance, normalized = make_importance("l1", 0), np.zeros(graph.n_atoms)
    for group in graph.groups:
        scores = np.asarray(importance(graph, group), dtype=float)
        normalized[group.atoms] = scores / np.mean(np.abs(scores))
    # latency_aware=False: without global ranking each group is cut alike (not the default time ranking)
    result = torchslim.prune_(model, X, torchslim.PruneConfig(target_macs=0.5, global_ranking=global_ranking,
                                                              latency_aware=False))
    assert result.macs_after <= 0.5 * result.macs_before
    atoms = {int(a) for name, dims in result.plan.steps[0].removed.items() for dim, index in dims.items()
             for a in graph.param_labels(name, int(dim))[index]}
    return float(normalized[sorted(atoms)].sum()), model


def test_target_macs_with_global_ranking_prefers_cheap_importance():
    """Ranked by importance per MAC saved, half the MACs cost less importance than cutting
    every group alike: b's channels save the most MACs each (b's 3x3 output and c's 3x3
    input), so b pays most and fewer channels go in all."""
    spent_global, ranked = _removed_importance(global_ranking=True)
    spent_alike, alike = _removed_importance(global_ranking=False)
    assert spent_global < 0.8 * spent_alike, (spent_global, spent_alike)
    assert ranked.b.out_channels < min(ranked.a.out_channels, ranked.c.out_channels)
    assert alike.a.out_channels == alike.b.out_channels == alike.c.out_channels


def test_per_module_ratios_and_input_protection():
    model = Three()
    torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5, ratios={"b": 0.25}))
    assert (model.a.out_channels, model.b.out_channels, model.c.out_channels) == (8, 12, 8)
    model = Three()
    torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5, protect_inputs=["c"]))
    assert model.c.in_channels == 16 and model.a.out_channels == 8  # b's outputs are c's inputs


def test_recipe_from_yaml(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "criterion: l2\nround_to: 2\nrules:\n"
        "  - op_types: [Conv2d]\n    sparsity_per_layer: 0.5\n"
        "  - op_names: [b]\n    sparsity_per_layer: 0.25\n"
        "  - op_names: [head]\n    exclude: true\n"
    )
    model = Three()
    config = config_from_recipe(model, recipe)
    assert config.criterion == "l2" and config.ratios["b"] == 0.25 and "head" in config.exclude
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, X, config)
    assert (model.a.out_channels, model.b.out_channels) == (8, 12)
    assert torchslim.verify(original, model, X, result.plan).ok


@pytest.mark.parametrize("rules,needle", [
    ([{"op_names": ["nope"], "sparsity": 0.5}], r"rules\[0\].*matches no module"),
    ([{"op_types": ["Conv2d"], "sparsity": 0.5, "colour": 1}], r"rules\[0\] has unknown key"),
    ([{"op_names": ["a"], "sparsity": 0.5}, {"op_names": ["a"], "exclude": True}], "conflict"),
    ([{"op_names": ["a"]}], r"rules\[0\] needs sparsity"),
    ([{"op_names": ["a"], "sparsity": 1.2}], r"rules\[0\]\.sparsity must be a number in \[0, 1\), got 1.2"),
])
def test_bad_recipes_fail_naming_the_rule(rules, needle):
    with pytest.raises(ValueError, match=needle):
        config_from_recipe(Three(), {"rules": rules})


@pytest.mark.parametrize("kwargs,field", [
    ({"target_macs": 0.5, "target_params": 0.5}, "target_params"),
    ({"max_sparsity_per_layer": 0}, "max_sparsity_per_layer"),
    ({"ratios": {"a": 1.0}}, "ratios"),
    ({"target_macs": -1}, "target_macs"),
])
def test_invalid_config_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        torchslim.PruneConfig(**kwargs)


def test_unreachable_target_fails_before_changes():
    model = Three()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="target_macs"):
        torchslim.prune_(model, X, torchslim.PruneConfig(target_macs=0.001, exclude=["a", "b"]))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_every_config_field_has_a_recipe_type_check():
    """A field whose annotation the recipe reader does not know would be accepted unchecked."""
    import dataclasses

    from torchslim.pruning.recipe import _FIELD_TYPES

    unchecked = [(f.name, str(f.type)) for f in dataclasses.fields(torchslim.PruneConfig) if str(f.type) not in _FIELD_TYPES]
    assert unchecked == []


def test_config_parts_partition_the_fields_and_state_their_defaults():
    """Each flat field belongs to exactly one part, with the same default; built from parts or
    from flat keywords, the config is the same object, and each part reads back."""
    from torchslim.pruning.config import PARTS, Amount, Ranking, Verification

    owners: dict[str, str] = {}
    for part_name, part in PARTS.items():
        for field in dataclasses.fields(part):
            assert field.name not in owners, (field.name, owners.get(field.name), part_name)
            owners[field.name] = part_name
    flat = {f.name: f.default for f in dataclasses.fields(torchslim.PruneConfig)}
    assert set(owners) == set(flat)
    for part_name, part in PARTS.items():
        assert {f.name: f.default for f in dataclasses.fields(part)} == {n: flat[n] for n, p in owners.items()
                                                                          if p == part_name}
    built = torchslim.PruneConfig.from_parts(Amount(target_macs=0.4, min_channels=2), Ranking(round_to=8),
                                             Verification(atol=1e-3), seed=3)
    assert built == torchslim.PruneConfig(target_macs=0.4, min_channels=2, round_to=8, atol=1e-3, seed=3)
    assert built.amount == Amount(target_macs=0.4, min_channels=2)
    assert built.ranking.round_to == 8 and built.ranking.seed == 3 and built.verification.atol == 1e-3
    assert built.scope == torchslim.PruneConfig().scope


def test_config_parts_are_refused_twice_or_of_the_wrong_kind():
    from torchslim.pruning.config import Amount

    with pytest.raises(ValueError, match="two Amount parts"):
        torchslim.PruneConfig.from_parts(Amount(ratio=0.2), Amount(ratio=0.3))
    with pytest.raises(TypeError, match="got dict"):
        torchslim.PruneConfig.from_parts({"ratio": 0.2})
    with pytest.raises(ValueError, match="ratio must be in"):  # parts are validated like flat fields
        torchslim.PruneConfig.from_parts(Amount(ratio=1.5))


@pytest.mark.parametrize("fields,expected", [
    ({}, None),
    ({"ratio": 0.3}, None),
    ({"target_macs": 0.5}, ("target_macs", "macs", 0.5)),
    ({"target_params": 1000}, ("target_params", "params", 1000.0)),
    ({"target_latency": 0.7}, ("target_latency", "latency", 0.7)),
])
def test_config_target_is_the_one_spelling_of_which_target(fields, expected):
    target = torchslim.PruneConfig(**fields).target
    assert (None if target is None else (target.field, target.quantity, target.value)) == expected


def test_selector_choices_return_a_new_selector_and_leave_the_given_one_alone():
    """Searches outside the selector (the latency loop) change it only through ``choosing``."""
    from torchslim.graph import DependencyGraph
    from torchslim.pruning.selector import Selector, eligible_groups

    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 1))
    x = torch.randn(1, 3, 12, 12)
    config = torchslim.PruneConfig(target_macs=0.5, latency_aware=False, global_ranking=True)
    graph = DependencyGraph.build(model, x)
    groups = eligible_groups(graph, config)
    selector = Selector(graph, groups, {g.index: np.arange(len(g), dtype=float) for g in groups}, config)
    chosen = selector.choosing(ranking="per_group", round_to=4)
    assert (selector.ranking, selector.round_to) == ("global", 1)
    assert (chosen.ranking, chosen.round_to) == ("per_group", 4)
    banned = np.zeros(graph.n_atoms, dtype=bool)
    _, removed = chosen.select(banned)
    kept = [len(g) - int(np.isin(g.atoms, removed).sum()) for g in groups]
    assert all(k % 4 == 0 for k in kept), kept
    with pytest.raises(TypeError, match="unknown choice"):
        selector.choosing(groups=[])
