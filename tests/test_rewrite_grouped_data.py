"""The grouped rewrite's data-aware fit: in-block weights by least squares on the layer's input
moments (checked against an independent ``torch.linalg.lstsq`` per output channel), the
reported error is the relative output error on the calibration data, never worse than the
data-free fit there, exact for a block-diagonal original; the planner uses these errors; the
data-free path is unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.rewrite import GroupedConv2d, RewriteConfig, fit_grouped, plan_rewrite, rewrite_
from torchslim.rewrite.grouped import assign_groups, channel_energy, grouped_errors

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_batches(cin: int, n: int = 3, size: int = 4, side: int = 7, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Batches whose channels are strongly mixed (a shared random mixing, anisotropic scales)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, cin, dtype=torch.float64)
    return [torch.einsum("dc,ncij->ndij", mix, torch.randn(size, cin, side, side, generator=gen,
                                                             dtype=torch.float64)).to(dtype) for _ in range(n)]


def unfolded(conv: nn.Conv2d, batches: list[torch.Tensor]) -> torch.Tensor:
    """Every input patch the conv multiplies by its weight, one row each (channel-major columns)."""
    rows = [F.unfold(x.double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
            for x in batches]
    return torch.cat([r.transpose(1, 2).reshape(-1, r.shape[1]) for r in rows])


def moment_of(conv: nn.Conv2d, batches: list[torch.Tensor]) -> torch.Tensor:
    rows = unfolded(conv, batches)
    return rows.T @ rows / rows.shape[0]


def output_error(conv: nn.Conv2d, block: nn.Module, batches: list[torch.Tensor]) -> float:
    """Relative error of the block's outputs against the conv's, the bias (shared) left out."""
    with torch.no_grad():
        x = torch.cat(batches)
        reference = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation).double()
        return float((block(x).double() - conv(x).double()).norm() / reference.norm())


def block_diagonal_conv(cin: int = 12, cout: int = 8, groups: int = 4, seed: int = 0) -> nn.Conv2d:
    """A dense 3x3 conv that is block-diagonal after hidden permutations of its inputs and outputs."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    w = torch.zeros_like(conv.weight)
    ni, no = cin // groups, cout // groups
    for g in range(groups):
        w[g * no:(g + 1) * no, g * ni:(g + 1) * ni] = torch.randn(no, ni, 3, 3)
    with torch.no_grad():
        conv.weight.copy_(w[torch.randperm(cout)][:, torch.randperm(cin)])
    return conv


@pytest.mark.parametrize("groups", [2, 3])
def test_in_block_weights_are_an_independent_least_squares_per_output_channel(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, stride=2).double()
    batches = correlated_batches(6, dtype=torch.float64)
    fit = fit_grouped(conv, groups, moment_of(conv, batches))
    block = fit.block
    assert isinstance(block, GroupedConv2d) and block.conv.groups == groups
    in_order = block.in_order or list(range(6))
    out_inverse = block.out_order or list(range(6))  # original output o is the grouped conv's row out_inverse[o]
    rows = unfolded(conv, batches)
    n = 6 // groups
    for o in range(6):
        r = out_inverse[o]
        channels = in_order[(r // n) * n:(r // n + 1) * n]
        columns = [c * 9 + t for c in channels for t in range(9)]
        target = rows @ conv.weight.detach().double()[o].reshape(-1)
        expected = torch.linalg.lstsq(rows[:, columns], target[:, None]).solution[:, 0]
        got = block.conv.weight.detach()[r].reshape(-1)
        assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_data_aware_output_error_beats_the_data_free_fit_on_correlated_inputs():
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    batches = correlated_batches(8)
    moment = moment_of(conv, batches)
    for groups in (2, 4, 8):
        free, aware = fit_grouped(conv, groups), fit_grouped(conv, groups, moment)
        free_error, aware_error = output_error(conv, free.block, batches), output_error(conv, aware.block, batches)
        assert aware_error < 0.9 * free_error, groups
    # on uncorrelated inputs it still never loses
    white = [torch.randn(4, 8, 7, 7) for _ in range(3)]
    moment = moment_of(conv, white)
    for groups in (2, 4):
        free, aware = fit_grouped(conv, groups), fit_grouped(conv, groups, moment)
        assert output_error(conv, aware.block, white) <= output_error(conv, free.block, white) * (1 + 1e-5)


def test_data_aware_fit_is_exact_for_a_block_diagonal_original():
    conv = block_diagonal_conv()
    batches = correlated_batches(12, seed=2)
    fit = fit_grouped(conv, 4, moment_of(conv, batches))
    assert fit.error < 1e-6
    x = torch.cat(batches)
    with torch.no_grad():
        torch.testing.assert_close(fit.block(x), conv(x), atol=1e-4, rtol=1e-4)


def test_reported_error_is_the_measured_output_error_on_the_calibration_batches_and_the_plan_uses_it():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1))
    conv = model[0]
    batches = correlated_batches(8, n=4, seed=3)
    moment = moment_of(conv, batches)
    plan, _ = plan_rewrite(model, batches[0], RewriteConfig(to="grouped", setting=4, data=batches))
    assert plan.layers[0].fit_error == pytest.approx(fit_grouped(conv, 4, moment).error, rel=1e-6)
    assert plan.layers[0].fit_error != pytest.approx(fit_grouped(conv, 4).error, rel=1e-3)
    original = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1))
    original.load_state_dict(model.state_dict())
    result = rewrite_(model, batches[0], RewriteConfig(to="grouped", setting=4, data=batches))
    assert isinstance(model[0], GroupedConv2d)
    assert result.errors["0"] == pytest.approx(output_error(original[0], model, batches), rel=1e-4)


def test_budget_planner_weighs_the_data_aware_errors():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    batches = correlated_batches(4, seed=4)
    with torch.no_grad():
        second_inputs = [model[1](model[0](x)) for x in batches]
    plan, _ = plan_rewrite(model, batches[0], RewriteConfig(to="grouped", target_macs=0.6, data=batches))
    expected = {"0": grouped_errors(model[0], moment_of(model[0], batches)),
                "2": grouped_errors(model[2], moment_of(model[2], second_inputs))}
    assert plan.layers
    for row in plan.layers:
        assert row.fit_error == pytest.approx(expected[row.name][row.setting], rel=1e-6)


def test_identity_moment_weighs_like_the_weights_and_a_wrong_moment_is_refused():
    torch.manual_seed(5)
    conv = nn.Conv2d(6, 4, 3)
    np.testing.assert_allclose(channel_energy(conv, torch.eye(54, dtype=torch.float64)), channel_energy(conv),
                               rtol=1e-12)
    for a, b in zip(assign_groups(conv, 2, torch.eye(54, dtype=torch.float64)), assign_groups(conv, 2)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"6 input channels and 9 taps must be 54 x 54, got \(6, 6\)"):
        fit_grouped(conv, 2, torch.eye(6))


REFERENCE = {  # fit_grouped(conv, g) before the data-aware fit existed (seed 7, Conv2d(12, 8, 3, padding=1))
    2: ([0, 2, 4, 5, 8, 10, 1, 3, 6, 7, 9, 11], [0, 1, 4, 5, 6, 2, 7, 3], 0.6667701601982117),
    4: ([1, 7, 11, 0, 2, 4, 3, 5, 10, 6, 8, 9], [4, 2, 5, 0, 6, 7, 1, 3], 0.8348656892776489),
}


@pytest.mark.parametrize("groups", [2, 4])
def test_data_free_fit_is_unchanged(groups):
    torch.manual_seed(7)
    conv = nn.Conv2d(12, 8, 3, padding=1)
    fit = fit_grouped(conv, groups)
    in_order, out_inverse, error = REFERENCE[groups]
    assert (fit.block.in_order, fit.block.out_order, fit.error) == (in_order, out_inverse, error)
    out_order = np.argsort(out_inverse)
    n_in, n_out = 12 // groups, 8 // groups
    w = conv.weight.detach()
    expected = torch.cat([w[out_order[g * n_out:(g + 1) * n_out]][:, in_order[g * n_in:(g + 1) * n_in]]
                          for g in range(groups)])
    assert torch.equal(fit.block.conv.weight.detach(), expected)
    assert torch.equal(fit.block.conv.bias.detach(), conv.bias.detach()[torch.as_tensor(out_order)])
    assert grouped_errors(conv)[groups] == error
