"""What lets prune_ work on a model that fills the machine: the check against the zeroed original
zeroes each tensor only while the layers reading it run, and the removal is applied tensor by
tensor, each sliced tensor keeping only its removed slices for the rollback (``Transaction(release=True)``).
Both leave the model bit for bit as it was after a rollback, and the pruned model equal to the
zeroed original."""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from _benchmarks import load_benchmark
from torchslim.criteria.norm import NormImportance
from torchslim.graph import DependencyGraph
from torchslim.pruning import zero_removed_
from torchslim.pruning._surgery import Transaction, apply_removal, slice_to_kept
from torchslim.pruning._zeroing import scopes_of, zeroed_while_used
from torchslim.pruning.verify import run_eval


def _use_count(storage: torch.UntypedStorage) -> int:
    return int(torch._C._storage_Use_Count(storage._cdata))


needs_use_count = pytest.mark.skipif(not hasattr(torch._C, "_storage_Use_Count"), reason="torch without storage use counts")


# Transaction(release=True) ---------------------------------------------------------------
@needs_use_count
def test_release_frees_the_old_storage_and_rolls_back_bit_for_bit():
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(6, 5))
    param.grad = torch.randn(6, 5)
    values, grad = param.detach().clone(), param.grad
    storage = param.untyped_storage()  # our reference: the only one left once the tensor lets go
    tx = Transaction(release=True)
    slice_to_kept(param, {0: np.array([0, 2, 5]), 1: np.array([1, 3])}, tx)
    assert param.shape == (3, 2) and param.grad.shape == (3, 2)
    assert torch.equal(param.detach(), values[[0, 2, 5]][:, [1, 3]])
    assert _use_count(storage) == 1  # neither the model nor the transaction holds the old data
    tx.rollback()
    assert torch.equal(param.detach(), values) and param.is_contiguous()
    assert param.grad is grad  # the gradient object comes back (it is kept whole)


@needs_use_count
def test_without_release_the_old_data_is_kept_for_the_rollback():
    param = nn.Parameter(torch.randn(6, 5))
    storage, ptr = param.untyped_storage(), param.data_ptr()
    tx = Transaction()
    slice_to_kept(param, {0: np.array([1, 2])}, tx)
    assert _use_count(storage) > 1
    tx.rollback()
    assert param.data_ptr() == ptr  # the same storage comes back


def test_release_leaves_a_shared_storage_alone():
    """A tensor whose storage another tensor also uses (a view held elsewhere, a slice of a flat
    buffer) is sliced the usual way: its rollback puts the shared storage itself back."""
    flat = torch.randn(40)
    param = nn.Parameter(flat[:30].view(6, 5))  # a view into a larger storage
    view = param.detach()[1:]
    ptr = param.data_ptr()
    tx = Transaction(release=True)
    slice_to_kept(param, {0: np.array([0, 3])}, tx)
    tx.rollback()
    assert param.data_ptr() == ptr and torch.equal(view, flat[5:30].view(5, 5))


@pytest.mark.parametrize("release", [False, True])
def test_apply_and_rollback_restore_every_tensor_and_attribute(release):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    graph = DependencyGraph.build(model, x)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    objects = {n: t for n, t in model.state_dict(keep_vars=True).items()}
    tx = Transaction(release=release)
    apply_removal(graph, graph.groups[0].atoms[::2], tx)
    assert model[0].out_channels == 8 and model[1].running_mean.shape == (8,)
    tx.rollback()
    assert model[0].out_channels == 16 and model[3].in_channels == 16
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert tensor is objects[name] and torch.equal(tensor, before[name]), name


# the zeroed original, one module call at a time -----------------------------------------
class Shared(nn.Module):
    """Weights read in several places: a layer called twice, an embedding tied to the output
    head at the top level, and a weight transposed in one module and used in another."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)
        self.proj = nn.Linear(16, 16, bias=False)
        self.tr = Transpose()
        self.mix = Mix()

    def forward(self, ids):
        h = self.emb(ids)
        h = self.b(torch.relu(self.a(h))) + h
        h = self.b(torch.relu(self.a(h))) + h  # a and b called twice
        w_t = self.tr(self.proj.weight)  # a weight view made in one module...
        h = self.mix(h, w_t)  # ...read in another
        return F.linear(h, self.emb.weight)  # the tied head, at the top level


class Transpose(nn.Module):
    def forward(self, weight):
        return weight.t()


class Mix(nn.Module):
    def forward(self, h, w_t):
        return h @ w_t


def _removal(graph: DependencyGraph) -> dict:
    atoms = np.concatenate([g.atoms[::3] for g in graph.groups])
    return graph.removal(atoms)


def test_zeroed_while_used_matches_zeroing_a_copy_and_restores_the_model():
    torch.manual_seed(0)
    model = Shared().eval()
    ids = torch.randint(0, 20, (2, 5))
    graph = DependencyGraph.build(model, ids, keep_outputs=False)
    removal = _removal(graph)
    assert {"emb.weight", "a.weight", "b.weight", "proj.weight"} <= set(removal)
    scopes = scopes_of(graph, list(removal))
    assert scopes["emb.weight"] == {""}  # read at the top level: zeroed for the whole forward
    assert scopes["a.weight"] == {"a"}
    assert scopes["proj.weight"] == {"tr", "mix"}  # transposed in tr, the transpose read in mix
    reference = copy.deepcopy(model)
    zero_removed_(reference, {n: {d: i.tolist() for d, i in dims.items()} for n, dims in removal.items()})
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with zeroed_while_used(graph, removal):
        outputs = run_eval(model, ids)
    assert torch.equal(outputs[0], run_eval(reference, ids)[0])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_zeroed_while_used_restores_the_model_when_the_forward_raises():
    torch.manual_seed(0)
    model = Shared().eval()
    ids = torch.randint(0, 20, (2, 5))
    graph = DependencyGraph.build(model, ids, keep_outputs=False)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}

    def boom(module, args):
        raise RuntimeError("boom")

    handle = model.mix.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), zeroed_while_used(graph, _removal(graph)):
        run_eval(model, ids)
    handle.remove()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not model.a._forward_pre_hooks and not model.a._forward_hooks  # the hooks are gone


def test_prune_with_shared_weights_equals_the_zeroed_original():
    torch.manual_seed(0)
    model = Shared().eval()
    ids = torch.randint(0, 20, (2, 5))
    original = copy.deepcopy(model)
    result = torchslim.prune_(model, ids, torchslim.PruneConfig(ratio=0.5))
    assert result.plan and model.a.out_features == 16
    assert torchslim.verify(original, model, ids, result.plan).ok


# memory ----------------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS read from /proc")
def test_prune_holds_no_second_copy_of_the_model(one_thread):
    """A 384 MB MLP pruned by half: before, the check cloned every tensor it zeroes and the
    removal kept the old tensors next to the kept slices (the peak grew by 1.2x the model);
    now it grows by what one tensor at a time needs (0.44x here, where each is a sixth of the
    model). Tensors of 64 MB: the allocator maps and unmaps them, so the peak is the program's."""
    torch.manual_seed(0)
    width, layers = 2048, 3
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, 4 * width), nn.ReLU(),
                                                                nn.Linear(4 * width, width))]).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    x = torch.randn(1, width)
    small = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    torchslim.prune_(small, torch.randn(1, 8), torchslim.PruneConfig(ratio=0.5))  # lazy imports load first
    memory = load_benchmark("llm_scale")  # its peak-RSS window: VmHWM after /proc/self/clear_refs
    if not memory.reset_peak():
        pytest.skip("the peak RSS cannot be reset here")
    start = memory.peak_gib()
    result = torchslim.prune_(model, x, torchslim.PruneConfig(ratio=0.5))
    grown = memory.peak_gib() - start
    assert result.plan and model[0].out_features == 2 * width
    assert grown < 0.6 * size, f"prune_ grew the peak RSS by {grown:.2f} GiB for a {size:.2f} GiB model"


# importance in half precision ------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2])
def test_half_precision_norms_match_the_float32_ones(p):
    """bfloat16 weights are upcast a block of rows at a time, not whole: the same scores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 64)).to(torch.bfloat16).eval()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    graph = DependencyGraph.build(model, x)
    as_float = copy.deepcopy(model).float()
    float_graph = DependencyGraph.build(as_float, x.float())
    for group, twin in zip(graph.groups, float_graph.groups):
        half, full = NormImportance(p)(graph, group), NormImportance(p)(float_graph, twin)
        np.testing.assert_allclose(half, full, rtol=1e-6)


def test_chunked_norms_reuse_one_buffer(monkeypatch):
    """Weights larger than the scratch limit are summed in blocks of rows into one buffer."""
    from torchslim.criteria import norm

    monkeypatch.setattr(norm, "SCRATCH_LIMIT", 1000)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 64)).to(torch.bfloat16).eval()
    graph = DependencyGraph.build(model, torch.randn(1, 64, dtype=torch.bfloat16))
    importance = NormImportance(1)
    scores = importance(graph, graph.groups[0])
    w1, w2 = model[0].weight.float(), model[2].weight.float()
    with torch.no_grad():
        expected = w1.abs().sum(1) + model[0].bias.float().abs() + w2.abs().sum(0)
    np.testing.assert_allclose(scores, expected.double().numpy(), rtol=1e-5)
    assert importance._scratch.numel() <= 1000


# save ------------------------------------------------------------------------------------
def test_save_streams_safetensors_that_safetensors_reads(tmp_path):
    """torchslim.save writes the tensors' own memory (hashing as it writes): every dtype reads
    back equal through safetensors, and meta.json's hash is the file's."""
    import hashlib
    import json

    from safetensors.torch import load_file

    from torchslim.io.serialization import write_safetensors

    tensors = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "f32": torch.randn(7), "bool": torch.tensor([True, False]),
               "i64": torch.arange(5), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
               "u8": torch.tensor([1, 2, 255], dtype=torch.uint8), "f16": torch.randn(2, 2).half()}
    sha = write_safetensors(tensors, tmp_path / "t.safetensors", {"format": "pt"})
    assert sha == hashlib.sha256((tmp_path / "t.safetensors").read_bytes()).hexdigest()
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(torch.bfloat16)
    torchslim.save(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "ck" / "model.safetensors").read_bytes()).hexdigest()
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(torch.bfloat16)
    torchslim.load(tmp_path / "ck", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
