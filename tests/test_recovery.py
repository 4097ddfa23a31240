"""Recovery helpers: BatchNorm recalibration against independently computed statistics,
fine-tuning that lowers the loss, distillation that really uses the teacher, accuracy."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim._timing import fixed_threads
from torchslim.recovery import distillation_loss, evaluate_accuracy, finetune, recalibrate_bn_


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and does not crawl when other jobs share the cores."""
    with fixed_threads(1):
        yield


def _garbage_stats(bn: nn.modules.batchnorm._BatchNorm) -> None:
    bn.running_mean.fill_(7.0)
    bn.running_var.fill_(0.01)
    bn.num_batches_tracked.fill_(123)


# recalibrate_bn_ ---------------------------------------------------------------------------------
def test_recalibrate_single_batch_equals_batch_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    weight, bias = bn.weight.detach().clone(), bn.bias.detach().clone()
    _garbage_stats(bn)
    bn.eval()
    x = torch.randn(16, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + torch.tensor([0.0, 1.0, -2.0, 5.0]).view(1, 4, 1, 1)

    assert recalibrate_bn_(bn, [x]) == 1

    torch.testing.assert_close(bn.running_mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, x.var(dim=(0, 2, 3), unbiased=True))
    assert int(bn.num_batches_tracked) == 1
    assert bn.momentum == 0.3 and bn.training is False  # momentum and flags restored
    torch.testing.assert_close(bn.weight.detach(), weight)  # affine parameters untouched
    torch.testing.assert_close(bn.bias.detach(), bias)


def test_recalibrate_several_batches_is_cumulative_average_and_respects_num_batches():
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(3)
    _garbage_stats(bn)
    batches = [torch.randn(10, 3) * (i + 1) + i for i in range(4)]

    assert recalibrate_bn_(bn, batches, num_batches=3) == 3

    used = batches[:3]  # the fourth (num_batches=3) must not count
    expected_mean = torch.stack([b.mean(0) for b in used]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in used]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert bn.momentum == 0.1 and bn.training is True  # a model in train mode stays in train mode


def test_recalibrate_inside_a_model_uses_eval_mode_for_the_rest_and_takes_xy_batches():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Dropout(p=0.9), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    model.train()
    _garbage_stats(model[2])
    x = torch.randn(8, 2, 6, 6)
    batches = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.zeros(4, dtype=torch.long))]

    recalibrate_bn_(model, batches)

    with torch.no_grad():
        feats = [model[0](x[:4]), model[0](x[4:])]  # no dropout: the rest of the model ran in eval mode
    torch.testing.assert_close(model[2].running_mean, torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0))
    torch.testing.assert_close(model[2].running_var, torch.stack([f.var(dim=(0, 2, 3)) for f in feats]).mean(0))
    assert all(m.training for m in model.modules())  # every flag restored


def test_recalibrate_accepts_dict_batches():
    class KwModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, features):
            return self.bn(features)

    model = KwModel().eval()
    x = torch.randn(12, 2)
    recalibrate_bn_(model, [{"features": x, "labels": torch.zeros(12)}])
    torch.testing.assert_close(model.bn.running_mean, x.mean(0))


def test_recalibrate_without_batches_keeps_the_old_statistics():
    bn = nn.BatchNorm1d(3)
    _garbage_stats(bn)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn_(bn, [])
    assert torch.all(bn.running_mean == 7.0) and torch.all(bn.running_var == 0.01)
    assert int(bn.num_batches_tracked) == 123 and bn.momentum == 0.1


def test_recalibrate_skips_norms_without_running_stats():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False))
    assert recalibrate_bn_(model, [torch.randn(4, 3)]) == 0
    assert recalibrate_bn_(nn.Linear(2, 2), [torch.randn(4, 2)]) == 0


# finetune --------------------------------------------------------------------------------------------
def _blobs(n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]])
    x = centers[y] + 0.5 * torch.randn(n, 2, generator=g)
    return x, y


def _batches(x, y, size: int = 32):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def _ce(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_finetune_reduces_the_loss_and_restores_flags():
    torch.manual_seed(0)
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)).eval()
    before = _ce(model, x, y)

    result = finetune(model, _batches(x, y), epochs=15, lr=1e-2, progress=False)

    after = _ce(model.eval(), x, y)
    assert after < 0.3 * before and after < 0.2
    assert result.steps == 15 * 8 and len(result.epoch_losses) == 15
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert evaluate_accuracy(model, _batches(x, y)) > 0.95
    finetune(model, _batches(x, y), epochs=1, progress=False)
    assert not any(m.training for m in model.modules())  # eval model comes back in eval


def test_finetune_cosine_schedule_and_max_steps():
    x, y = _blobs(64)
    model = nn.Linear(2, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    result = finetune(model, _batches(x, y, 16), epochs=3, optimizer=opt, schedule="cosine", progress=False)
    assert result.steps == 12
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # decayed to zero at the end

    result = finetune(model, _batches(x, y, 16), epochs=10, max_steps=5, progress=False)
    assert result.steps == 5 and len(result.epoch_losses) == 2
    with pytest.raises(ValueError, match="schedule"):
        finetune(model, _batches(x, y), schedule="step", progress=False)


def test_distillation_loss_matches_the_formula():
    torch.manual_seed(3)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    T, a = 3.0, 0.7
    p_t = F.softmax(t / T, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean() * T * T
    expected = (1 - a) * F.cross_entropy(s, y) + a * kl
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=a, temperature=T), expected)
    torch.testing.assert_close(distillation_loss(s, s, None, temperature=T), torch.tensor(0.0))


def test_distillation_learns_from_the_teacher_not_the_labels():
    torch.manual_seed(4)
    x, y = _blobs(192, seed=4)
    teacher = nn.Linear(2, 3)
    with torch.no_grad():  # a teacher whose classes are the true ones rotated by one
        teacher.weight.copy_(torch.tensor([[0.0, -2.5], [2.0, 0.0], [-2.0, 1.0]]) * 2)
        teacher.bias.zero_()
    teacher.train()  # finetune must run it in eval mode and give the flag back
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    teacher.register_forward_hook(lambda m, i, o: modes.append(m.training))
    with torch.no_grad():
        teacher_pred = teacher(x).argmax(1)
    assert (teacher_pred == y).float().mean() < 0.2
    modes.clear()

    student = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    finetune(student, _batches(x, y), epochs=20, lr=1e-2, teacher=teacher, kd_alpha=1.0, temperature=2.0,
             progress=False)

    with torch.no_grad():
        student_pred = student(x).argmax(1)
    assert (student_pred == teacher_pred).float().mean() > 0.9  # it follows the teacher ...
    assert (student_pred == y).float().mean() < 0.2  # ... not the labels
    assert modes and not any(modes) and teacher.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k])  # the teacher is never updated


def test_finetune_kd_mixes_label_and_teacher_terms():
    x, y = _blobs(64, seed=5)
    teacher = nn.Linear(2, 3)
    a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    b.load_state_dict(a.state_dict())
    ra = finetune(a, _batches(x, y), epochs=1, lr=1e-2, progress=False)
    rb = finetune(b, _batches(x, y), epochs=1, lr=1e-2, teacher=teacher, kd_alpha=0.5, progress=False)
    assert not math.isclose(ra.epoch_losses[0], rb.epoch_losses[0])
    assert not torch.allclose(a.weight, b.weight)


def test_finetune_rejects_bad_arguments():
    model = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="kd_alpha"):
        finetune(model, [], kd_alpha=1.5, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        finetune(model, [], temperature=0, progress=False)
    with pytest.raises(ValueError, match="targets"):
        finetune(model, [torch.randn(4, 2)], progress=False)


def test_evaluate_accuracy_counts_top1_and_restores_mode():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    model.train()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert evaluate_accuracy(model, [(x[:2], y[:2]), (x[2:], y[2:])]) == pytest.approx(0.75)
    assert model.training
    with pytest.raises(ValueError, match="no batches"):
        evaluate_accuracy(model, [])
