"""One registry type behind op rules, module rules, module handlers, criteria and model factories.

The stated subclass rule (exact type first, then the nearest registered base class along the
MRO), duplicate refusal, the unknown-key message, and each extension point used end to end.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from torchslim._registry import Registry, UnknownKeyError
from torchslim.criteria import CRITERIA, register_criterion, scatter_to_atoms
from torchslim.graph import DependencyGraph
from torchslim.graph.rules import rule_for
from torchslim.graph.rules._registry import _RULES
from torchslim.models import create_model, register_model


class Base:
    pass


class Left(Base):
    pass


class Right(Base):
    pass


class Diamond(Left, Right):  # MRO: Diamond, Left, Right, Base, object
    pass


class Leaf(Diamond):
    pass


# ----------------------------------------------------------------------------- the rule itself


def test_for_type_takes_the_exact_type_then_the_nearest_base_along_the_mro():
    registry: Registry[type, str] = Registry("thing")
    registry.register(Base, "base")
    registry.register(Right, "right")  # registered after Base and before Left: order must not matter
    registry.register(Leaf, "leaf")
    assert registry.for_type(Leaf) == "leaf"          # exact type first
    assert registry.for_type(Diamond) == "right"      # Left is unregistered, Right comes before Base
    registry.register(Left, "left")
    assert registry.for_type(Diamond) == "left"       # Left precedes Right in Diamond's MRO
    assert registry.for_type(Left) == "left" and registry.for_type(Base) == "base"
    assert registry.for_type(int) is None and registry.for_type(int, "none") == "none"


def test_a_key_registered_twice_is_refused_unless_replace():
    registry: Registry[str, int] = Registry("widget")
    registry.register("a", 1)
    with pytest.raises(ValueError, match=r"widget 'a' is already registered.*replace=True"):
        registry.register("a", 2)
    with pytest.raises(ValueError, match="'a'"):
        registry["a"] = 2
    assert registry["a"] == 1
    registry.register("a", 3, replace=True)
    assert registry["a"] == 3


def test_an_unknown_key_names_itself_and_the_known_ones():
    registry: Registry[type, int] = Registry("widget")
    registry.register(Left, 1)
    registry.register(Base, 2)
    with pytest.raises(UnknownKeyError) as info:
        registry[Right]
    assert str(info.value) == "unknown widget 'Right'; known: Base, Left"
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError, match="unknown widget 'Right'"):
        del registry[Right]


def test_the_library_registries_refuse_duplicates_and_name_unknown_keys():
    with pytest.raises(ValueError, match="criterion 'l1' is already registered"):
        register_criterion("l1", lambda seed: None)
    with pytest.raises(ValueError, match=r"op rule 'aten\.relu' is already registered"):
        torchslim.op_rule(torch.ops.aten.relu)(lambda c, op, trace: None)
    with pytest.raises(ValueError, match="module handler 'Linear' is already registered"):
        torchslim.register_module_handler(nn.Linear)(lambda module, ctx: None)
    with pytest.raises(ValueError, match="torchslim model 'modnet' is already registered"):
        register_model("modnet")(lambda: nn.Identity())
    with pytest.raises(KeyError, match=r"unknown criterion 'bogus'; known: apoz, bn_scale, .*l1, l2"):
        CRITERIA["bogus"]
    with pytest.raises(KeyError, match="unknown torchslim model 'nope'; known: digits_cnn, modnet"):
        create_model("nope")


def test_a_refused_op_rule_registration_changes_nothing():
    before = rule_for(torch.ops.aten.relu.default)
    fresh = torch.ops.aten.nextafter  # an op without a rule of its own
    assert fresh not in _RULES
    with pytest.raises(ValueError):
        torchslim.op_rule(fresh, torch.ops.aten.relu)(lambda c, op, trace: None)
    assert fresh not in _RULES
    assert rule_for(torch.ops.aten.relu.default) is before


# ----------------------------------------------------------------------------- criteria


def _ranked_by_fixed_values(values: np.ndarray, param: str):
    """A criterion scoring the group holding ``param``'s output channels by ``values`` (others: zeros)."""

    class FixedValues:
        def __init__(self, seed: int) -> None:
            self.seed = seed

        def __call__(self, graph, group):
            scores = np.zeros(len(group))
            if (param, 0) in group.params:
                scatter_to_atoms(graph, group, graph.param_labels(param, 0), values, scores)
            return scores

    return FixedValues


def test_a_registered_criterion_drives_prune_and_the_cli_choices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    original = copy.deepcopy(model)
    values = np.array([5.0, 1.0, 7.0, 0.0, 3.0, 6.0, 2.0, 4.0])  # not the L1 order of the weights
    register_criterion("fixed_values_test", _ranked_by_fixed_values(values, "0.weight"))
    try:
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5, criterion="fixed_values_test"))
        from torchslim.cli import build_parser

        args = build_parser().parse_args(["prune", "torchslim:digits_cnn", "--ratio", "0.5", "--out", "o",
                                          "--criterion", "fixed_values_test"])
        assert args.criterion == "fixed_values_test"
    finally:
        del CRITERIA["fixed_values_test"]
    kept = np.sort(np.argsort(values)[4:])  # the four highest values stay: channels 0, 2, 5, 7
    assert kept.tolist() == [0, 2, 5, 7]
    assert result.groups_pruned == 1
    torch.testing.assert_close(model[0].weight, original[0].weight[kept], rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_mean, original[1].running_mean[kept], rtol=0, atol=0)
    torch.testing.assert_close(model[3].weight, original[3].weight[:, kept], rtol=0, atol=0)
    assert torchslim.verify(original, model, x, result.plan).ok
    assert "fixed_values_test" not in CRITERIA


# ----------------------------------------------------------------------------- handlers and rules


class Scale(nn.Module):
    """A per-channel scale that records its width in an attribute its forward never reads."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)
        self.channels = channels
        self.handled_by = ""

    def forward(self, x):
        return x * self.weight


def test_the_most_specific_module_handler_wins_whatever_the_registration_order():
    from torchslim.pruning._surgery import _HANDLERS

    class ChildScale(Scale):
        pass

    class GrandChildScale(ChildScale):
        pass

    def set_width(label):
        def handler(module, ctx):
            ctx.set(module, "channels", ctx.shape(module, "weight")[0])
            ctx.set(module, "handled_by", label)

        return handler

    torchslim.register_module_handler(ChildScale)(set_width("child"))  # the subclass first, the base after
    torchslim.register_module_handler(Scale)(set_width("base"))
    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 1), Scale(8), nn.Conv2d(8, 8, 1), GrandChildScale(8), nn.Conv2d(8, 4, 1))
        torch.manual_seed(0)
        x = torch.randn(1, 3, 4, 4)
        original = copy.deepcopy(model)
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    finally:
        del _HANDLERS[ChildScale], _HANDLERS[Scale]
    assert (model[1].handled_by, model[1].channels) == ("base", 4)
    assert (model[3].handled_by, model[3].channels) == ("child", 4)  # nearest registered base along its MRO
    assert torchslim.verify(original, model, x, result.plan).ok


class TwinConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_a_module_rule_for_a_base_class_applies_to_its_subclasses():
    from torchslim.graph.dependency import _MODULE_RULES

    class SubTwinConvs(TwinConvs):
        pass

    @torchslim.register_module_rule(TwinConvs)
    def _tie(c, module, name, trace):
        c.same(trace.param_nodes[f"{name}.a.weight"], 0, trace.param_nodes[f"{name}.b.weight"], 0)

    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 1), SubTwinConvs(), nn.ReLU(), nn.Conv2d(32, 4, 1))
        x = torch.randn(1, 3, 8, 8)
        graph = DependencyGraph.build(model, x)
        original = copy.deepcopy(model)
        result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    finally:
        del _MODULE_RULES[TwinConvs]
    twins = next(g for g in graph.groups if ("1.a.weight", 0) in g.params)
    assert len(twins) == 16  # a's channel i and b's channel i are one atom: the rule ran on the subclass
    assert model[1].a.out_channels == model[1].b.out_channels == 8
    assert torchslim.verify(original, model, x, result.plan).ok
