"""Kwon et al.'s mask search on the engine: ``criterion="fisher"`` with ``global_ranking`` and a
MACs target compares Fisher scores across layers as they are (estimated loss increases), so the
budget goes where the loss per MAC saved is least, not evenly as per-group-normalised scores
would spread it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from torchslim.criteria import FisherImportance, comparable_across_groups, make_importance, random_projection_loss
from torchslim.graph import DependencyGraph


class TwoBranches(nn.Module):
    """``a(x) + b(x)``: two hidden layers of 16 units with equal MACs per unit; branch b's
    output weights are scaled by ``quiet`` so that its units barely change the output."""

    def __init__(self, quiet: float = 1e-3):
        super().__init__()
        self.a_in, self.a_out = nn.Linear(8, 16), nn.Linear(16, 4)
        self.b_in, self.b_out = nn.Linear(8, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.b_out.weight.mul_(quiet)

    def forward(self, x):
        return self.a_out(torch.relu(self.a_in(x))) + self.b_out(torch.relu(self.b_in(x)))


def _batches(n: int = 8):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(32, 8, generator=generator) for _ in range(n)]


def test_fisher_declares_comparable_scores_and_norms_do_not():
    assert comparable_across_groups(make_importance("fisher"))
    assert not comparable_across_groups(make_importance("l1"))


def test_global_fisher_spends_the_budget_on_the_quiet_layer():
    torch.manual_seed(0)
    model = TwoBranches()
    x = torch.randn(4, 8)
    # every unit saves 8 + 4 MACs of 384: 0.75 of the MACs removes 8 units
    result = torchslim.prune_(model, x, torchslim.PruneConfig(target_macs=0.75, global_ranking=True,
                                                              criterion="fisher", round_to=1),
                              data=_batches(), loss_fn=random_projection_loss())
    assert result.macs_after / result.macs_before == pytest.approx(0.75)
    assert model.a_in.out_features == 16  # the loud branch keeps every unit
    assert model.b_in.out_features == 8


def test_the_removed_units_are_the_lowest_fisher_scores():
    torch.manual_seed(1)
    model = TwoBranches(quiet=1.0)
    with torch.no_grad():
        model.b_out.weight[:, :6].mul_(1e-3)  # six quiet units in b; the rest compete with a's
    x = torch.randn(4, 8)
    graph = DependencyGraph.build(model, x)
    fisher = FisherImportance()
    fisher.prepare(graph, _batches(), random_projection_loss())
    scores = {name: fisher(graph, g) for g in graph.groups
              for name in ("a_in", "b_in") if graph.module_output_atoms(name).tolist() == g.atoms.tolist()}
    lowest = sorted((float(s), name, i) for name, group_scores in scores.items() for i, s in enumerate(group_scores))[:10]
    expected = {name: sorted(i for _, n, i in lowest if n == name) for name in ("a_in", "b_in")}

    kept = {}
    original_weights = {name: getattr(model, name).weight.detach().clone() for name in ("a_in", "b_in")}
    torchslim.prune_(model, x, torchslim.PruneConfig(target_macs=1 - 10 * 12 / 384, global_ranking=True,
                                                     criterion="fisher", round_to=1),
                     data=_batches(), loss_fn=random_projection_loss())
    for name in ("a_in", "b_in"):
        weight = getattr(model, name).weight.detach()
        rows = [int(torch.nonzero((original_weights[name] == row).all(1))[0]) for row in weight]
        kept[name] = rows
    removed = {name: sorted(set(range(16)) - set(rows)) for name, rows in kept.items()}
    assert removed == expected
    assert set(range(6)) <= set(removed["b_in"])


def test_mask_search_on_bert_prunes_heads_where_they_matter_least():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # layer 1's attention barely reaches the residual stream
        model.encoder.layer[1].attention.output.dense.weight.mul_(1e-4)
    ids = torch.randint(0, 100, (2, 12))
    data = [((), {"input_ids": torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(i))})
            for i in range(6)]
    loss = random_projection_loss(lambda out, batch: out.last_hidden_state)
    reference = model(ids).last_hidden_state
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(target_macs=0.85, global_ranking=True,
                                                               criterion="fisher", round_to=1),
                              data=data, loss_fn=loss)
    heads = [layer.attention.self.num_attention_heads for layer in model.encoder.layer]
    assert heads[1] < min(heads[0], heads[2])  # the quiet layer loses its heads first
    assert result.macs_after / result.macs_before <= 0.85
    ffn = [layer.intermediate.dense.out_features for layer in model.encoder.layer]
    assert len(set(ffn)) > 1 or len(set(heads)) > 1  # not a uniform cut
    assert result.max_abs_error is not None and np.isfinite(result.max_abs_error)
    assert model(ids).last_hidden_state.shape == reference.shape
