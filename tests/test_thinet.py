"""ThiNet's greedy next-layer criterion: its channel-by-channel error matrix is the output change
of the consumer layer (conv patches included) and adds up over batches; the greedy order is the
exhaustive best subset on a crafted case where a weight norm ranks the other way; as a
criterion of prune_ it prunes exactly on residual and attention models and needs data."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.criteria.thinet import ThiNetImportance, channel_error_matrix, greedy_order
from torchslim.graph import DependencyGraph

from archs import ARCHS


pytestmark = pytest.mark.usefixtures("one_thread")


def _crafted() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(400, 6, dtype=torch.float64)
    x[:, 2] *= 0.05  # large weights, almost no input: cheap to remove, yet last by weight norm
    x[:, 4] = x[:, 3] + 0.1 * torch.randn(400, dtype=torch.float64)  # 3 and 4 carry one signal...
    w = torch.randn(3, 6, dtype=torch.float64)
    w[:, 2] *= 10
    w[:, 3] *= 0.4
    w[:, 4] = w[:, 3]  # ... with the same weights: removing both costs four times one of them
    w[:, 5] *= 0.5
    return x, w


def test_greedy_order_is_the_exhaustive_best_subset_here_and_not_the_weight_norm_order():
    x, w = _crafted()
    layer = nn.Linear(6, 3, bias=False).double()
    layer.weight.data = w
    order = greedy_order(channel_error_matrix(layer, x).numpy())

    def error(removed) -> float:
        return float(((x[:, list(removed)] @ w[:, list(removed)].T) ** 2).sum())

    for k in range(1, 6):
        best = min(itertools.combinations(range(6), k), key=error)
        assert sorted(order[:k].tolist()) == sorted(best)
    assert order[0] == 2 and int(np.argsort((w ** 2).sum(0).numpy())[-1]) == 2


def test_error_matrix_is_the_conv_output_change_and_adds_over_batches():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 4, 3, stride=2, padding=1, dilation=1).double()
    x = torch.randn(6, 5, 9, 9, dtype=torch.float64)
    matrix = channel_error_matrix(conv, x)
    for removed in ([0], [1, 3], [0, 2, 4]):
        only = torch.zeros_like(x)
        only[:, removed] = x[:, removed]
        change = F.conv2d(only, conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation)
        assert matrix[removed][:, removed].sum().item() == pytest.approx(float((change ** 2).sum()), rel=1e-9)
    halves = channel_error_matrix(conv, x[:3]) + channel_error_matrix(conv, x[3:])
    torch.testing.assert_close(halves, matrix)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.b(torch.relu(self.a(h)))
        return self.head(h.mean((2, 3)))


def test_as_a_criterion_it_prunes_exactly_and_ranks_by_the_consumers_error():
    torch.manual_seed(2)
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    with torch.no_grad():
        model.a.weight[[1, 5]] *= 0.0  # a's channels 1 and 5 output only their bias: b sees constants
        model.a.bias[[1, 5]] = -5.0  # ... and the ReLU zeroes them: removing them changes nothing
    importance = ThiNetImportance()
    graph = DependencyGraph.build(model, x)
    importance.prepare(graph, data)
    group = next(g for g in graph.groups if ("a.weight", 0) in g.params)
    scores = importance(graph, group)
    labels = graph.param_labels("a.weight", 0)
    lowest = {int(np.flatnonzero(labels == group.atoms[i])[0]) for i in np.argsort(scores)[:2]}
    assert lowest == {1, 5}
    pruned = Residual().eval()
    pruned.load_state_dict(model.state_dict())
    result = torchslim.prune_(pruned, x, torchslim.PruneConfig(ratio=0.25, criterion="thinet"), data=data)
    assert result.max_abs_error is not None and result.max_abs_error < 1e-4 and pruned.a.out_channels == 9


def test_needs_data():
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"thinet.*needs data"):
        torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.25, criterion="thinet"))
    assert model.a.out_channels == 12


@pytest.mark.parametrize("name", ["concat_channels", "depthwise", "hf_attention", "llama_gqa_rmsnorm_swiglu",
                                  "vit_cls_pos_embed", "modnet_mini"])
def test_prunes_with_verification_on_concat_depthwise_attention_and_modnet_models(name):
    model, inputs = ARCHS[name]()
    before = sum(p.numel() for p in model.parameters())
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(ratio=0.3, criterion="thinet"),
                              data=[inputs, inputs])
    assert result.groups_pruned > 0 and sum(p.numel() for p in model.parameters()) < before
    assert result.max_abs_error is not None and result.max_abs_error < 1e-3  # verified against the zeroed original
