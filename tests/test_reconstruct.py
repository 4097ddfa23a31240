"""Least-squares reconstruction after pruning: exact where the removed inputs are linear
combinations of kept ones, the ridge solution equals an independent lstsq, bias compensation of
a constant channel is exact, Gram accumulation is batch-independent, and on the digits CNN it
brings the accuracy right after pruning back near the original."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _digits import trained_digits_cnn

import torchslim
from torchslim.reconstruct import RankDeficientWarning, collect_grams, input_rows, reconstruct_, refit

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoLinear(nn.Module):
    def __init__(self, hidden: int = 6) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, hidden), nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _prune_hidden(model: TwoLinear, x: torch.Tensor, keep_out_of_fc1: list[int]) -> TwoLinear:
    """Remove fc1's other outputs (and fc2's matching inputs) through the engine."""
    from torchslim.graph import DependencyGraph
    from torchslim.pruning import remove_

    graph = DependencyGraph.build(model, x)
    labels = graph.param_labels("fc1.weight", 0)
    gone = [labels[i] for i in range(model.fc1.out_features) if i not in keep_out_of_fc1]
    remove_(graph, torch.as_tensor(gone).numpy(), x)
    return model


@torch.no_grad()
def _make_hidden_4_and_5_combinations(model: TwoLinear) -> None:
    """hidden 4 = hidden 0 + 2 * hidden 1, hidden 5 = hidden 2 - hidden 3 (weights and biases)."""
    model.fc1.weight[4] = model.fc1.weight[0] + 2 * model.fc1.weight[1]
    model.fc1.bias[4] = model.fc1.bias[0] + 2 * model.fc1.bias[1]
    model.fc1.weight[5] = model.fc1.weight[2] - model.fc1.weight[3]
    model.fc1.bias[5] = model.fc1.bias[2] - model.fc1.bias[3]


@pytest.mark.parametrize("sequential", [False, True])
def test_removed_inputs_that_are_combinations_of_kept_ones_are_restored_exactly(sequential):
    torch.manual_seed(0)
    model = TwoLinear()
    _make_hidden_4_and_5_combinations(model)
    original = copy.deepcopy(model)
    x = torch.randn(64, 4)
    pruned = _prune_hidden(model, x[:1], [0, 1, 2, 3])
    assert not torch.allclose(pruned(x), original(x), atol=1e-3)
    report = reconstruct_(pruned, original, [x[:32], x[32:]], ridge=0.0, sequential=sequential)
    torch.testing.assert_close(pruned(x), original(x), atol=1e-5, rtol=1e-5)
    before, after = report.errors["fc2"]
    assert before > 0.01 and after < 1e-6


def test_the_ridge_solution_equals_an_independent_lstsq():
    torch.manual_seed(1)
    x = torch.randn(50, 7, dtype=torch.float64)
    w = torch.randn(3, 7, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 6])
    gram = x.T @ x
    ridge = 0.05
    lam = ridge * gram[kept][:, kept].diagonal().mean()
    # min ||x w^T - x_K v^T||^2 + lam ||v - w_K||^2 as one stacked least-squares problem
    a = torch.cat([x[:, kept], lam.sqrt() * torch.eye(4, dtype=torch.float64)])
    b = torch.cat([x @ w.T, lam.sqrt() * w[:, kept].T])
    expected = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(refit(w, gram, kept, ridge=ridge).weight, expected)
    # a huge ridge keeps the kept weights as they are; none fits the calibration rows alone
    torch.testing.assert_close(refit(w, gram, kept, ridge=1e9).weight, w[:, kept], atol=1e-6, rtol=1e-6)
    unregularised = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    torch.testing.assert_close(refit(w, gram, kept, ridge=0.0).weight, unregularised)


def test_a_removed_constant_channel_moves_into_the_bias_exactly():
    torch.manual_seed(2)
    model = TwoLinear(hidden=5)
    with torch.no_grad():
        model.fc1.weight[4] = 0.0  # hidden 4 is the constant 0.7 whatever the input
        model.fc1.bias[4] = 0.7
    original = copy.deepcopy(model)
    x = torch.randn(40, 4)
    pruned = _prune_hidden(model, x[:1], [0, 1, 2, 3])
    reconstruct_(pruned, original, [x], ridge=0.0)
    torch.testing.assert_close(pruned(x), original(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pruned.fc2.bias, original.fc2.bias + 0.7 * original.fc2.weight[:, 4])


def test_gram_accumulation_over_batches_equals_one_batch_of_all_rows_for_convs_too():
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2)
    model = nn.Sequential(conv)
    x = torch.randn(6, 3, 9, 9)
    split = collect_grams(model, {"0": conv}, [x[:2], x[2:5], x[5:]])
    whole = collect_grams(model, {"0": conv}, [x])
    torch.testing.assert_close(split.grams["0"], whole.grams["0"])
    rows = input_rows(conv, x).double()
    assert split.rows["0"] == rows.shape[0] == 6 * 25
    # the unfolded rows times the weight are the convolution (without bias)
    out = (rows @ conv.weight.detach().double().reshape(5, -1).T).reshape(6, 25, 5).transpose(1, 2).reshape(6, 5, 5, 5)
    torch.testing.assert_close(out.float(), conv(x) - conv.bias[None, :, None, None], atol=1e-5, rtol=1e-5)


def test_too_few_rows_warn_and_no_data_is_refused():
    torch.manual_seed(4)
    model = TwoLinear(hidden=6)
    original = copy.deepcopy(model)
    x = torch.randn(3, 4)
    pruned = _prune_hidden(model, x[:1], [0, 1, 2, 3, 4])
    with pytest.warns(RankDeficientWarning, match="give at least 6 rows"):
        reconstruct_(pruned, original, [x[:2]])
    with pytest.raises(ValueError, match="no calibration batches"):
        reconstruct_(pruned, original, [])


def test_digits_cnn_right_after_pruning_comes_back_near_the_original():
    from torchslim.recovery import recalibrate_bn_

    model, (X, Y, XT, YT) = trained_digits_cnn()
    model.eval()
    accuracy = lambda m: (m(XT).argmax(1) == YT).float().mean().item()  # noqa: E731
    pruned = copy.deepcopy(model)
    torchslim.prune_(pruned, X[:1], torchslim.PruneConfig(target_macs=0.25))
    calibration = [X[i:i + 128] for i in range(0, 1024, 128)]
    recalibrate_bn_(pruned, calibration[:2])
    plain = accuracy(pruned)
    report = reconstruct_(pruned, model, calibration)
    recalibrate_bn_(pruned, calibration[:2])
    assert all(after < before for before, after in report.errors.values())
    assert accuracy(pruned) > plain + 0.05 and accuracy(pruned) > accuracy(model) - 0.02


class WideRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 40), nn.Linear(40, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _anchored_ridge_fit(w: torch.Tensor, rows: torch.Tensor, kept: list[int], ridge: float) -> torch.Tensor:
    """Independent of the library: argmin ||R W^T - R_K V^T||^2 + lam ||V - W_K||^2 on explicit rows,
    lam = ridge * mean(diag(R_K^T R_K)) (the library's documented scaling), solved by lstsq on the
    stacked system."""
    rk = rows[:, kept]
    lam = ridge * float((rk * rk).sum(0).mean())
    stacked = torch.cat([rk, lam ** 0.5 * torch.eye(len(kept), dtype=rows.dtype)])
    targets = torch.cat([rows @ w.T, lam ** 0.5 * w[:, kept].T])
    return torch.linalg.lstsq(stacked, targets).solution.T


@pytest.mark.parametrize("sequential", [False, True])  # one pruned layer: its own inputs are the original's kept ones
def test_auto_ridge_is_the_grid_value_with_least_held_out_error(sequential):
    from torchslim.reconstruct.api import RIDGE_GRID

    torch.manual_seed(3)
    model = WideRelu()
    original = copy.deepcopy(model)
    batches = [torch.randn(12, 16) for _ in range(6)]  # 72 rows for 31 kept columns: the ridge matters
    keep = list(range(30))
    from torchslim.graph import DependencyGraph
    from torchslim.pruning import remove_

    graph = DependencyGraph.build(model, batches[0])
    labels = graph.param_labels("fc1.weight", 0)
    remove_(graph, labels[30:], batches[0])
    report = reconstruct_(model, original, batches, ridge="auto", sequential=sequential)

    def rows_of(chunk):  # fc2's input rows with the bias column, on the original model
        with torch.no_grad():
            hidden = torch.relu(original.fc1(torch.cat(chunk))).double()
        return torch.cat([hidden, torch.ones(hidden.shape[0], 1, dtype=hidden.dtype)], dim=1)

    w = torch.cat([original.fc2.weight, original.fc2.bias[:, None]], dim=1).detach().double()
    columns = keep + [40]
    halves = [rows_of(batches[0::2]), rows_of(batches[1::2])]
    held_out = []
    for ridge in RIDGE_GRID:
        error = 0.0
        for fit_on, score_on in ((halves[0], halves[1]), (halves[1], halves[0])):
            fitted = _anchored_ridge_fit(w, fit_on, columns, ridge)
            error += float(((score_on @ w.T - score_on[:, columns] @ fitted.T) ** 2).sum())
        held_out.append(error)
    assert report.ridges["fc2"] == RIDGE_GRID[held_out.index(min(held_out))]
    final = _anchored_ridge_fit(w, torch.cat(halves), columns, report.ridges["fc2"])
    torch.testing.assert_close(model.fc2.weight.detach().double(), final[:, :-1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.fc2.bias.detach().double(), final[:, -1], atol=1e-6, rtol=1e-5)


class ThreeRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 24), nn.Linear(24, 20), nn.Linear(20, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_sequential_auto_ridge_fits_the_next_layer_on_the_refitted_models_own_inputs():
    """fc3 reads fc2's kept outputs as the pruned model computes them once fc2 is re-fitted:
    its ridge and weights equal an independent cross-validated lstsq on those explicit rows
    against the original's fc3 output on the original rows."""
    from torchslim.graph import DependencyGraph
    from torchslim.pruning import remove_
    from torchslim.reconstruct.api import RIDGE_GRID

    torch.manual_seed(5)
    model = ThreeRelu()
    original = copy.deepcopy(model)
    batches = [torch.randn(10, 8) for _ in range(4)]  # 40 rows for fc3's 15 kept columns + bias
    graph = DependencyGraph.build(model, batches[0])
    gone = [graph.param_labels("fc1.weight", 0)[i] for i in range(16, 24)]
    gone += [graph.param_labels("fc2.weight", 0)[i] for i in range(15, 20)]
    remove_(graph, torch.as_tensor(gone).numpy(), batches[0])
    before = copy.deepcopy(model)  # fc3 as pruned: the anchor its ridge pulls toward
    report = reconstruct_(model, original, batches, ridge="auto", sequential=True)
    assert set(report.errors) == {"fc2", "fc3"}

    def with_ones(t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        return torch.cat([t, torch.ones(t.shape[0], 1, dtype=t.dtype)], dim=1)

    def rows(chunk, net):  # fc3's input rows: fc2 of the re-fitted pruned model / of the original
        with torch.no_grad():
            return with_ones(torch.relu(net.fc2(torch.relu(net.fc1(torch.cat(chunk))))))

    w = torch.cat([original.fc3.weight, original.fc3.bias[:, None]], dim=1).detach().double()
    anchor = torch.cat([before.fc3.weight, before.fc3.bias[:, None]], dim=1).detach().double()

    def fit(chunk, ridge):  # argmin ||X W^T - Y V^T||^2 + lam ||V - anchor||^2, stacked, by lstsq
        x, y = rows(chunk, original), rows(chunk, model)
        lam = ridge * float((y * y).sum(0).mean())
        stacked = torch.cat([y, lam ** 0.5 * torch.eye(y.shape[1], dtype=y.dtype)])
        targets = torch.cat([x @ w.T, lam ** 0.5 * anchor.T])
        return torch.linalg.lstsq(stacked, targets).solution.T

    def held_out(ridge):
        error = 0.0
        for fit_on, score_on in ((batches[0::2], batches[1::2]), (batches[1::2], batches[0::2])):
            v = fit(fit_on, ridge)
            error += float(((rows(score_on, original) @ w.T - rows(score_on, model) @ v.T) ** 2).sum())
        return error

    errors = [held_out(r) for r in RIDGE_GRID]
    assert report.ridges["fc3"] == RIDGE_GRID[errors.index(min(errors))]
    expected = fit(batches, report.ridges["fc3"])
    torch.testing.assert_close(model.fc3.weight.detach().double(), expected[:, :-1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.fc3.bias.detach().double(), expected[:, -1], atol=1e-6, rtol=1e-5)


def test_auto_ridge_takes_the_smallest_ridge_where_the_fit_is_exact():
    from torchslim.reconstruct.api import RIDGE_GRID

    torch.manual_seed(0)
    model = TwoLinear()
    _make_hidden_4_and_5_combinations(model)  # every calibration half reproduces the other exactly
    original = copy.deepcopy(model)
    x = torch.randn(64, 4)
    pruned = _prune_hidden(model, x[:1], [0, 1, 2, 3])
    report = reconstruct_(pruned, original, [x[:32], x[32:]], ridge="auto")
    assert report.ridges["fc2"] == RIDGE_GRID[0]
    before, after = report.errors["fc2"]
    assert before > 0.01 and after < 1e-3


@pytest.mark.parametrize("kwargs, message", [
    ({"ridge": -1.0}, "ridge must be"), ({"ridge": "large"}, "ridge must be"),
    ({"ridge": "large", "sequential": True}, "ridge must be"),
])
def test_bad_ridges_are_refused_before_anything_changes(kwargs, message):
    torch.manual_seed(0)
    model = TwoLinear()
    original = copy.deepcopy(model)
    x = torch.randn(16, 4)
    pruned = _prune_hidden(model, x[:1], [0, 1, 2, 3])
    state = copy.deepcopy(pruned.state_dict())
    with pytest.raises(ValueError, match=message):
        reconstruct_(pruned, original, [x[:8], x[8:]], **kwargs)
    for sequential in (False, True):
        with pytest.raises(ValueError, match="at least 2 calibration batches"):
            reconstruct_(pruned, original, [x], ridge="auto", sequential=sequential)
    assert all(torch.equal(state[k], v) for k, v in pruned.state_dict().items())


def test_an_original_that_the_history_does_not_describe_is_refused_by_name():
    torch.manual_seed(0)
    model = TwoLinear()
    x = torch.randn(16, 4)
    _prune_hidden(model, x[:1], [0, 1, 2, 3])
    original = copy.deepcopy(model)  # already pruned: the history runs from the 6-wide model
    result = torchslim.prune_(model, x[:1], torchslim.PruneConfig(ratio=0.5, latency_aware=False))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layer 'fc2'.*plan=result\.plan"):
        reconstruct_(model, original, [x])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    reconstruct_(model, original, [x], plan=result.plan)  # the step between them fits
