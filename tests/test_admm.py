"""ADMM structured pruning on the engine's groups: the projection keeps whole channels of a
dependency group in every coupled tensor, chosen by their energy summed over those tensors; the
penalty's gradient, the dual update and the rho schedule follow the method; training with it
drives the removed channels to zero so that the hard prune keeps the accuracy."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _digits import trained_digits_cnn

import torchslim
from torchslim.pruning import zero_removed_
from torchslim.search import ADMMPruner

pytestmark = pytest.mark.usefixtures("one_thread")


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def _energy_of_conv1_channels(model: Chain, shift: dict[str, torch.Tensor]) -> np.ndarray:
    """By hand: conv1's output channel c lives in conv1.weight[c], conv1.bias[c], bn1.weight[c],
    bn1.bias[c] and conv2.weight[:, c]."""
    t = {n: (p.detach() + shift.get(n, 0)).double() for n, p in model.named_parameters()}
    e = (t["conv1.weight"] ** 2).sum((1, 2, 3)) + t["conv1.bias"] ** 2 + t["bn1.weight"] ** 2 + t["bn1.bias"] ** 2
    return (e + (t["conv2.weight"] ** 2).sum((0, 2, 3))).numpy()


def test_the_projection_keeps_whole_channels_in_every_coupled_tensor_by_their_energy():
    model, x = Chain().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.conv1.weight[[1, 4, 6]] *= 0.05  # three planted weak channels
    admm = ADMMPruner(model, x, torchslim.PruneConfig(ratio=0.375, exclude=["conv2"]))
    energy = _energy_of_conv1_channels(model, {})
    group = admm.groups[0]
    labels = admm.graph.param_labels("conv1.weight", 0)
    np.testing.assert_allclose(admm.channel_energy({n: p for n, p in admm.params.items()})[labels], energy, rtol=1e-9)
    gone = sorted(np.flatnonzero(np.isin(labels, admm.removed_atoms)).tolist())
    assert gone == [1, 4, 6] and len(admm.removed_atoms) == 3 and set(admm.removed_atoms) <= set(group.atoms)
    for name, dim in [("conv1.weight", 0), ("conv1.bias", 0), ("bn1.weight", 0), ("bn1.bias", 0), ("conv2.weight", 1)]:
        z = admm.Z[name].movedim(dim, 0).reshape(8, -1)
        w = admm.params[name].detach().movedim(dim, 0).reshape(8, -1)  # U starts at zero: Z = W on kept channels
        kept = [0, 2, 3, 5, 7]
        assert torch.count_nonzero(z[gone]) == 0 and torch.equal(z[kept], w[kept])


def test_penalty_gradient_dual_update_and_rho_schedule():
    model, x = Chain().eval(), torch.randn(2, 3, 8, 8)
    admm = ADMMPruner(model, x, torchslim.PruneConfig(ratio=0.5), rho=0.1, rho_growth=2.0, rho_max=0.3, update_every=2)
    with torch.no_grad():
        for p in admm.params.values():
            p.add_(0.01 * torch.randn_like(p))
    admm.penalty().backward()
    for name, p in admm.params.items():
        torch.testing.assert_close(p.grad, 0.1 * (p.detach() - admm.Z[name] + admm.U[name]))
    before = {n: u.clone() for n, u in admm.U.items()}
    assert admm.step() is None  # step 1 of 2
    state = admm.step()
    assert state is not None and state.rho == pytest.approx(0.1) and admm.rho == pytest.approx(0.2)
    for name, p in admm.params.items():  # the dual moves by W - Z, then is rescaled to the grown rho
        torch.testing.assert_close(admm.U[name], (before[name] + p.detach() - admm.Z[name]) * 0.1 / 0.2)
    admm.step(), admm.step()
    assert admm.rho == pytest.approx(0.3)  # capped at rho_max


def test_the_first_projection_leaves_the_dual_at_zero_so_removed_weights_are_pulled_to_zero():
    model, x = Chain().eval(), torch.randn(2, 3, 8, 8)
    admm = ADMMPruner(model, x, torchslim.PruneConfig(ratio=0.5), rho=0.1)
    assert len(admm.history) == 1 and admm.removed_atoms.size > 0
    assert all(torch.count_nonzero(u) == 0 for u in admm.U.values())
    admm.penalty().backward()
    for name, p in admm.params.items():  # rho * (W - Z): removed entries toward 0, kept ones left alone
        torch.testing.assert_close(p.grad, 0.1 * (p.detach() - admm.Z[name]))
        kept = admm.Z[name] != 0
        assert torch.count_nonzero(p.grad[kept]) == 0


def test_training_with_admm_then_the_hard_prune_keeps_accuracy_where_one_shot_loses_it():
    model, (X, Y, XT, YT) = trained_digits_cnn()
    one_shot = copy.deepcopy(model).eval()
    config = torchslim.PruneConfig(target_macs=0.2, latency_aware=False)
    admm = ADMMPruner(model, X[:1], config, rho=0.01, update_every=20)
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    for _ in range(20):
        for i in range(0, len(X), 64):
            opt.zero_grad()
            (F.cross_entropy(model(X[i:i + 64]), Y[i:i + 64]) + admm.penalty()).backward()
            opt.step()
            admm.step()
    assert admm.history[-1].residual < 0.2 * admm.history[0].residual
    model.eval()
    zeroed = copy.deepcopy(model)
    zero_removed_(zeroed, {n: {d: i.tolist() for d, i in dims.items()} for n, dims in admm.graph.removal(admm.removed_atoms).items()})
    result = admm.finalize_()
    assert 0.19 <= result.macs_after / result.macs_before <= 0.2
    torch.testing.assert_close(model(XT), zeroed(XT), atol=1e-4, rtol=1e-4)
    accuracy = (model(XT).argmax(1) == YT).float().mean().item()
    torchslim.prune_(one_shot, X[:1], config)
    assert accuracy > 0.9 and accuracy > (one_shot(XT).argmax(1) == YT).float().mean().item() + 0.1


def test_bad_settings_are_refused():
    model, x = Chain().eval(), torch.randn(2, 3, 8, 8)
    for kwargs, message in [({"rho": 0.0}, "rho > 0"), ({"update_every": 0}, "update_every"),
                            ({"rho": 0.5, "rho_max": 0.1}, "rho_max >= rho")]:
        with pytest.raises(ValueError, match=message):
            ADMMPruner(model, x, **kwargs)
    with pytest.raises(ValueError, match="no prunable group"):
        ADMMPruner(model, x, torchslim.PruneConfig(exclude=["conv1", "conv2", "fc"]))
