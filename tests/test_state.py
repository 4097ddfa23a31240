"""State that outlives a pruning: optimizers built before ``prune_``/``load`` keep training the
model (same parameter objects, per-parameter state sliced), and a stale state fails loudly."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import torchslim
from torchslim.graph import DependencyGraph
from torchslim.pruning import zero_removed_
from torchslim.pruning._surgery import Transaction, apply_removal
from torchslim.recovery import finetune
from torchslim.schedules import AGPPruner, prune_iteratively

X = torch.randn(4, 3, 8, 8)


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 3))


class Tied(nn.Module):
    """An embedding and an output head sharing one weight, and a buffer shared by two modules."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.linspace(1.0, 2.0, 16))

    def forward(self, ids):
        h = self.emb(ids) * self.scale
        return self.head(h + self.mlp(h))


def loss_of(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    return model(x).pow(2).mean()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor = X) -> None:
    opt.zero_grad()
    loss_of(model, x).backward()
    opt.step()


def kept_indices(plan: torchslim.PruningPlan, name: str, shape) -> dict[int, torch.Tensor]:
    """Per pruned dim of ``name``, the original indices that survive ``plan``."""
    out = {}
    for dim, gone in plan.removed.get(name, {}).items():
        out[dim] = torch.as_tensor(np.setdiff1d(np.arange(shape[dim]), gone), dtype=torch.long)
    return out


def take(tensor: torch.Tensor, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    for dim, index in kept.items():
        tensor = tensor.index_select(dim, index)
    return tensor


# ---------------------------------------------------------------------------------------
# parameters stay the same objects
# ---------------------------------------------------------------------------------------
def test_optimizer_built_before_prune_keeps_training_the_model():
    model = net()
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5))
    assert result.plan and model[0].weight.shape[0] == 8
    assert all(a is b for a, b in zip(model.parameters(), params_before))  # the optimizer's objects
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} not updated by the optimizer built before prune_"


def test_surgery_keeps_objects_tied_and_rollback_restores_them_bit_for_bit():
    model = Tied().eval()
    ids = torch.randint(0, 20, (2, 5))
    graph = DependencyGraph.build(model, ids)
    objects = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    storage = {n: t.data_ptr() for n, t in objects.items()}
    values = {n: t.detach().clone() for n, t in objects.items()}
    model.emb.weight.grad = torch.randn_like(model.emb.weight)
    grad = model.emb.weight.grad
    group = next(g for g in graph.groups if "emb.weight" in graph.removal(g.atoms))
    tx = Transaction()
    apply_removal(graph, group.atoms[: len(group.atoms) // 2], tx)
    assert model.emb.weight.shape[1] < 16 and model.scale.shape[0] == model.emb.weight.shape[1]
    assert model.head.weight is model.emb.weight is objects["emb.weight"]  # tied, and the same object
    assert model.scale is objects["scale"]
    assert model.emb.weight.grad.shape == model.emb.weight.shape  # the gradient follows the data
    tx.rollback()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert tensor is objects[name] and tensor.data_ptr() == storage[name], name
        assert torch.equal(tensor, values[name]), name
    assert model.emb.weight.grad is grad and model.head.weight is model.emb.weight


# ---------------------------------------------------------------------------------------
# optimizer state
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
], ids=["adamw", "adam", "sgd-momentum"])
def test_prune_slices_optimizer_state_to_the_kept_indices(make):
    model = net()
    opt = make(model.parameters())
    for _ in range(3):
        train_step(model, opt)
    # reference: the same model and optimizer state, the removed slices zeroed instead of cut
    reference = copy.deepcopy(model)
    ref_opt = make(reference.parameters())
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own tensors: steps update them in place
    old_state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in model.named_parameters()}

    result = torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5), optimizer=opt)
    assert result.plan
    sliced = 0
    for name, p in model.named_parameters():
        kept = kept_indices(result.plan, name, shapes[name])
        for key, old in old_state[name].items():
            new = opt.state[p][key]
            if key == "step":
                assert torch.equal(new, old)  # the scalar step count is untouched
                continue
            assert new.shape == p.shape, (name, key)
            assert torch.equal(new, take(old, kept)), (name, key)
            sliced += bool(kept)
    assert sliced >= 3

    # one more step on the pruned model equals the step on the zeroed original, at the kept indices
    zero_removed_(reference, result.plan.removed)
    train_step(model, opt)
    train_step(reference, ref_opt)
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, take(ref.detach(), kept_indices(result.plan, name, shapes[name])), atol=1e-6), name


def test_stale_state_without_the_optimizer_raises_naming_the_parameter():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt)
    torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5))
    with pytest.raises(torchslim.StaleOptimizerStateError, match=r"'exp_avg' of parameter '0\.weight' has shape \[16, 3, 3, 3\]"):
        train_step(model, opt)
    # an optimizer without state yet (built before, never stepped) just works
    fresh_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model[0].weight.detach().clone()
    train_step(model, fresh_opt)
    assert not torch.equal(model[0].weight, before)


def test_prune_refuses_a_non_optimizer_before_touching_the_model():
    model = net()
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5), optimizer=[model.parameters()])
    assert model[0].weight.shape[0] == 16


# ---------------------------------------------------------------------------------------
# load, schedules, recovery
# ---------------------------------------------------------------------------------------
def test_optimizer_built_before_load_trains_the_loaded_model(tmp_path):
    model = net()
    result = torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5))
    torchslim.save(model, tmp_path, result)
    fresh = net(seed=1)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    torchslim.load(tmp_path, fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)
    before = fresh[0].weight.detach().clone()
    train_step(fresh, opt)
    assert not torch.equal(fresh[0].weight, before)


def test_agp_finalize_slices_the_optimizer_it_was_given():
    model = net().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = AGPPruner(model, X, final_sparsity=0.5, total_steps=4, frequency=2, optimizer=opt)
    for _ in range(5):
        train_step(model, opt)
        pruner.step()
    result = pruner.finalize()
    assert result.plan and model[0].weight.shape[0] == 8
    assert opt.state[model[0].weight]["momentum_buffer"].shape == model[0].weight.shape
    before = model[0].weight.detach().clone()
    train_step(model, opt)  # training goes on with the same optimizer after the removal
    assert not torch.equal(model[0].weight, before)


def test_prune_iteratively_slices_the_optimizer_between_rounds():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    changed = []

    def tune(m, step):
        before = m[0].weight.detach().clone()
        train_step(m, opt)
        changed.append(not torch.equal(m[0].weight, before))

    result = prune_iteratively(model, X, torchslim.PruneConfig(ratio=0.5), steps=2, finetune=tune, optimizer=opt)
    assert len(result.steps) == 2 and changed == [True, True]
    assert opt.state[model[0].weight]["exp_avg"].shape == model[0].weight.shape


def test_finetune_with_an_optimizer_built_before_pruning():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt)
    torchslim.prune_(model, X, torchslim.PruneConfig(ratio=0.5), optimizer=opt)
    batches = [(X, torch.zeros(4, dtype=torch.long))] * 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune(model, batches, epochs=1, optimizer=opt, progress=False)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
