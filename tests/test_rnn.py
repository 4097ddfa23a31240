"""LSTM / GRU / RNN: hidden units (and projection units) prune exactly, sizes follow, MACs agree.

Every pruned model is compared with its original with the removed units zeroed: a removed
unit's rows in all gates, its columns in ``weight_hh`` / ``weight_hr`` and in the next layer.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import torchslim
from torchslim.graph import DependencyGraph
from torchslim.graph.macs import estimate_macs

CASES = {
    "lstm": ("LSTM", {}),
    "lstm_bi_stacked_batch_first": ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True)),
    "lstm_proj_bi": ("LSTM", dict(proj_size=6, num_layers=2, bidirectional=True)),
    "gru_bi_stacked": ("GRU", dict(num_layers=2, bidirectional=True)),
    "gru_batch_first": ("GRU", dict(batch_first=True)),
    "rnn_tanh_stacked": ("RNN", dict(num_layers=2)),
    "rnn_relu_bi": ("RNN", dict(nonlinearity="relu", bidirectional=True)),
}


class Tagger(nn.Module):
    """Linear -> recurrent layer -> Linear on every step (a sequence tagger)."""

    def __init__(self, kind: str, **kwargs):
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.rnn = getattr(nn, kind)(12, 16, **kwargs)
        width = (kwargs.get("proj_size") or 16) * (2 if kwargs.get("bidirectional") else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.rnn(self.embed(x))[0])


def _prune(model: nn.Module, inputs, **config):
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, inputs, torchslim.PruneConfig(**config))
    assert not result.skipped, result.skipped
    report = torchslim.verify(original, model, inputs, result.plan)
    assert report.ok, report.message
    return result


def _macs(model: nn.Module, inputs) -> tuple[int, int]:
    """(graph estimate, analysis count): the pruner's and the analysis's MACs of one model."""
    return estimate_macs(DependencyGraph.build(model, inputs)), torchslim.analyze(model, inputs, latency=False).total_macs


def _sizes_follow_weights(rnn: nn.RNNBase) -> None:
    gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
    directions = 2 if rnn.bidirectional else 1
    state = rnn.proj_size or rnn.hidden_size
    for layer in range(rnn.num_layers):
        for suffix in ("", "_reverse")[:directions]:
            inputs = rnn.input_size if layer == 0 else directions * state
            assert getattr(rnn, f"weight_ih_l{layer}{suffix}").shape == (gates * rnn.hidden_size, inputs)
            assert getattr(rnn, f"weight_hh_l{layer}{suffix}").shape == (gates * rnn.hidden_size, state)
            if rnn.proj_size:
                assert getattr(rnn, f"weight_hr_l{layer}{suffix}").shape == (rnn.proj_size, rnn.hidden_size)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hidden_units_prune_exactly(name):
    """All gates of a unit go together, in every layer and direction; hidden_size, proj_size and
    input_size follow; the MACs the pruner reports are the analysis's, before and after."""
    kind, kwargs = CASES[name]
    torch.manual_seed(0)
    model = Tagger(kind, **kwargs).eval()
    x = torch.randn(5, 4, 6)
    groups = [g for g in DependencyGraph.build(model, x).groups if any(p.startswith("rnn.") for p, _ in g.params)]
    assert len(groups) == (3 if kwargs.get("proj_size") else 2) and all(g.exact for g in groups)  # input, units (, proj)
    result = _prune(model, x, ratio=0.5)
    rnn = model.rnn
    assert (rnn.input_size, rnn.hidden_size, rnn.proj_size) == (6, 8, 3 if rnn.proj_size else 0)
    _sizes_follow_weights(rnn)
    assert model.head.in_features == (2 if rnn.bidirectional else 1) * (rnn.proj_size or rnn.hidden_size)
    assert _macs(model, x) == (result.macs_after, result.macs_after)
    assert result.macs_after < result.macs_before


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_graph_and_analysis_count_the_same_recurrent_macs(kind):
    """LSTM runs as one fused ``mkldnn_rnn_layer`` per layer on CPU, which torch's counter
    misses (counted 0); GRU and RNN run as matmuls. Both counts: rows x weight matrices."""
    model, x = Tagger(kind, num_layers=2, bidirectional=True).eval(), torch.randn(5, 4, 6)
    rows, state = 5 * 4, 16
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    recurrent = rows * 2 * gates * state * ((12 + state) + (2 * state + state))  # 2 directions x 2 layers
    expected = recurrent + rows * (6 * 12 + 2 * state * 3)
    assert _macs(model, x) == (expected, expected)


class PackedTagger(Tagger):
    """Variable-length sequences: pack_padded_sequence in, then either the packed rows straight
    into the head, the final state, or pad_packed_sequence (which builds the padded output in
    ``aten.full`` sized from the packed data: it holds one value everywhere, so it shrinks with
    the units it receives)."""

    def __init__(self, readout: str):
        super().__init__("LSTM", batch_first=True, bidirectional=True)
        self.readout = readout
        if readout == "final_state":
            self.head = nn.Linear(16, 3)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(self.embed(x), lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.rnn(packed)
        if self.readout == "rows":
            return self.head(out.data)
        if self.readout == "final_state":
            return self.head(h_n[-1])
        return self.head(pad_packed_sequence(out, batch_first=True)[0])


@pytest.mark.parametrize("readout, hidden", [("rows", 8), ("final_state", 8), ("padded", 8)])
def test_packed_sequences_prune_exactly(readout, hidden):
    torch.manual_seed(0)
    model = PackedTagger(readout).eval()
    inputs = (torch.randn(3, 7, 6), torch.tensor([7, 4, 2]))
    result = _prune(model, inputs, ratio=0.5)
    assert (model.rnn.input_size, model.rnn.hidden_size) == (6, hidden)
    assert _macs(model, inputs) == (result.macs_after, result.macs_after)


class Classifier(nn.Module):
    """Classifies from the last layer's final state; the initial state comes from a Linear on a
    context vector (so its units are the recurrent units, and non-zero)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.rnn = getattr(nn, kind)(6, 16, num_layers=2)
        self.init_h = nn.Linear(4, 16)
        self.init_c = nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x, context):
        h0 = torch.tanh(self.init_h(context)).unsqueeze(0).expand(2, -1, -1).contiguous()
        state = (h0, torch.tanh(self.init_c(context)).unsqueeze(0).expand(2, -1, -1).contiguous()) \
            if self.kind == "LSTM" else h0
        _, hidden = self.rnn(x, state)
        h_n = hidden[0] if self.kind == "LSTM" else hidden
        return self.head(h_n[-1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_initial_state_from_a_layer_and_final_state_readout(kind):
    torch.manual_seed(0)
    model = Classifier(kind).eval()
    inputs = (torch.randn(5, 2, 6), torch.randn(2, 4))
    _prune(model, inputs, ratio=0.5)
    assert model.rnn.hidden_size == model.init_h.out_features == model.head.in_features == 8
    if kind == "LSTM":
        assert model.init_c.out_features == 8


class GivenState(nn.Module):
    """The initial state handed in by the caller, or made in forward from an attribute."""

    def __init__(self, made_inside: bool):
        super().__init__()
        self.made_inside, self.hidden = made_inside, 16
        self.embed, self.rnn, self.head = nn.Linear(6, 12), nn.GRU(12, 16), nn.Linear(16, 3)

    def forward(self, x, h0=None):
        if self.made_inside:
            h0 = torch.zeros(1, x.shape[1], self.hidden)
        return self.head(self.rnn(self.embed(x), h0)[0])


def test_an_initial_state_of_fixed_width_holds_the_units():
    """A state whose width the model's interface fixes keeps the units; the input width still prunes."""
    model = GivenState(made_inside=False).eval()
    _prune(model, (torch.randn(5, 2, 6), torch.randn(1, 2, 16)), ratio=0.5)
    assert (model.rnn.input_size, model.rnn.hidden_size) == (6, 16)


def test_a_zero_initial_state_made_in_forward_shrinks_with_the_units():
    """``torch.zeros(1, batch, self.hidden)`` is zero at every unit: it shrinks with them, and
    the attribute that sizes it follows."""
    model = GivenState(made_inside=True).eval()
    _prune(model, (torch.randn(5, 2, 6),), ratio=0.5)
    assert (model.rnn.input_size, model.rnn.hidden_size, model.hidden) == (6, 8, 8)


def test_gru_target_macs():
    """The recurrent weights are most of a GRU tagger's MACs: a 0.5 target is met (it stopped
    at 60% while the hidden size could not prune)."""
    torch.manual_seed(0)
    model, x = Tagger("GRU", num_layers=2).eval(), torch.randn(10, 4, 6)
    result = _prune(model, x, target_macs=0.5)
    assert result.macs_after <= 0.5 * result.macs_before
    assert model.rnn.hidden_size < 16
    assert _macs(model, x)[1] == result.macs_after


def test_pruned_lstm_saves_and_loads(tmp_path):
    """The plan's size changes (hidden_size, proj_size, input_size) replay on a fresh model."""
    torch.manual_seed(0)
    model, x = Tagger("LSTM", proj_size=6, num_layers=2, bidirectional=True).eval(), torch.randn(5, 4, 6)
    result = _prune(model, x, ratio=0.5)
    torchslim.save(model, tmp_path / "ckpt", result.plan)
    loaded = torchslim.load(tmp_path / "ckpt", Tagger("LSTM", proj_size=6, num_layers=2, bidirectional=True).eval())
    assert (loaded.rnn.hidden_size, loaded.rnn.proj_size, loaded.rnn.input_size) == (8, 3, 6)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_cudnn_rnn_kernel_is_counted_like_the_layer():
    """On CUDA an LSTM runs as one ``_cudnn_rnn`` call (weights as a flat list, biases among
    them), which torch's counter misses; counted here on meta tensors, as the analysis would."""
    from torch.utils.flop_counter import FlopCounterMode

    from torchslim.graph._formulas import CUSTOM_MAPPING

    steps, batch, features, hidden = 5, 3, 12, 16
    weights = [torch.empty(shape, device="meta") for shape in ((4 * hidden, features), (4 * hidden, hidden),
                                                                 (4 * hidden,), (4 * hidden,))]
    x, state = torch.empty(steps, batch, features, device="meta"), torch.empty(1, batch, hidden, device="meta")
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_MAPPING)
    with counter:
        torch.ops.aten._cudnn_rnn(x, weights, 4, None, state, state, 2, hidden, 0, 1, False, 0.0, False, False, [], None)
    assert counter.get_total_flops() // 2 == steps * batch * 4 * hidden * (features + hidden)
