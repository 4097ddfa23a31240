"""torchslim under ``torchrun --nproc_per_node=2`` (gloo, CPU, loopback): the same results as one
process. The scenarios live in tests/_distributed_worker.py; each torchrun launch is bounded."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import _distributed_worker as worker
import torchslim
from torchslim.distributed import all_reduce_arrays, broadcast_array, is_distributed, refuse_wrapped, world_size

pytest.importorskip("sklearn")
WORKER = Path(__file__).with_name("_distributed_worker.py")
#: float32 sums in another order (two half-batches averaged by DDP vs one batch) after six SGD
#: momentum steps: 1.5e-8 measured; Adam's normalisation would blow up the noise of near-zero gradients
WEIGHT_ATOL = 1e-6


def _torchrun(out: Path, *scenarios: str, expect_rc: int = 0) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(WORKER.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--max-restarts=0", str(WORKER), str(out), *scenarios],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == expect_rc or (expect_rc and done.returncode != 0), done.stdout[-3000:] + done.stderr[-3000:]


def _load(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}-rank{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One launch runs every scenario that needs no crash (the worker's startup is the slow part)."""
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(out, "finetune", "criteria", "agp", "resume", "fsdp", "local", "sandwich")
    return out


def test_ddp_finetune_matches_one_process_on_the_global_batch(two_ranks):
    one = worker.scenario_finetune()
    for rank in (0, 1):
        got = _load(two_ranks, "finetune", rank)
        assert got.keys() == one.keys()
        for key, value in one.items():
            assert torch.allclose(got[key].float(), value.float(), atol=WEIGHT_ATOL, rtol=0), key
    start = worker.pruned_model().state_dict()
    moved = max(float((one[k].float() - start[k].float()).abs().max()) for k in one)
    assert moved > 100 * WEIGHT_ATOL  # training moved the weights far more than the tolerance


def test_data_driven_criteria_over_two_shards_choose_as_one_process_over_both(two_ranks):
    one = worker.scenario_criteria()
    for rank in (0, 1):
        got = _load(two_ranks, "criteria", rank)
        assert got["chosen"] == one["chosen"]
        assert got["bn_batches"] == one["bn_batches"] == 20
        for name, value in one["bn"].items():
            assert torch.allclose(got["bn"][name], value, atol=1e-6, rtol=1e-5), name
        for ridge, fitted in one["reconstructed"].items():  # Gram matrices reduced over the ranks
            mine = got["reconstructed"][ridge]
            assert mine["rows"] == fitted["rows"] and mine["ridges"] == fitted["ridges"], ridge
            for name, value in fitted["weights"].items():
                assert torch.allclose(mine["weights"][name], value, atol=1e-5, rtol=1e-4), (ridge, name)
    half = {k: _half_choice(k) for k in ("taylor", "fisher", "apoz", "thinet")}
    assert any(half[k] != one["chosen"][k] for k in half)  # one shard alone would choose otherwise
    alone = worker.reconstructed(worker.shard_batches(0))["0.0001"]
    assert alone["rows"] < one["reconstructed"]["0.0001"]["rows"]
    assert any(not torch.allclose(alone["weights"][n], v, atol=1e-5, rtol=1e-4)
               for n, v in one["reconstructed"]["0.0001"]["weights"].items())


def _half_choice(criterion: str) -> dict:
    """What a criterion chooses on rank 0's shard alone."""
    model = worker.pruned_model()
    batches = worker.shard_batches(0)
    result = torchslim.prune_(model, torch.zeros(1, 1, 8, 8),
                              torchslim.PruneConfig(ratio=0.5, criterion=criterion, latency_aware=False),
                              data=batches, loss_fn=worker.cross_entropy)
    return result.plan.removed


def test_agp_masks_are_identical_on_both_ranks_at_every_step(two_ranks):
    zero, one = _load(two_ranks, "agp", 0), _load(two_ranks, "agp", 1)
    assert len(zero["masks"]) == len(one["masks"]) == 3  # sparsity grows at steps 2, 4, 6
    for step0, step1 in zip(zero["masks"], one["masks"]):
        assert step0.keys() == step1.keys() and step0
        assert all(torch.equal(step0[name], step1[name]) for name in step0)
    assert zero["removed"] == one["removed"] and zero["removed"]
    assert zero["state"].keys() == one["state"].keys()
    assert all(torch.equal(zero["state"][k], one["state"][k]) for k in zero["state"])


def test_a_killed_distributed_finetune_resumes_from_its_checkpoint(two_ranks, tmp_path):
    # 10 batches an epoch; the 14th is asked for (one batch ahead) during step 13, after step 12's checkpoint
    _torchrun(tmp_path, "resume:14", expect_rc=1)
    assert (tmp_path / "resume-ckpt" / "finetune_state.pt").exists() and not (tmp_path / "resume-rank0.pt").exists()
    state = torch.load(tmp_path / "resume-ckpt" / "finetune_state.pt", weights_only=True)
    assert state["step"] == 12 and state["epoch"] == 1 and state["world_size"] == 2
    _torchrun(tmp_path, "resume")
    for rank in (0, 1):
        resumed, straight = _load(tmp_path, "resume", rank), _load(two_ranks, "resume", rank)
        assert resumed["steps"] == straight["steps"] == 14
        assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-6)
        for key, value in straight["state"].items():
            assert torch.allclose(resumed["state"][key], value, atol=1e-6, rtol=0), key


def test_fsdp2_sharded_finetune_keeps_masks_and_resumes_like_one_process(two_ranks, tmp_path):
    one = worker.scenario_fsdp(tmp_path / "ckpt")
    assert one["resumed_steps"] == 2
    for rank in (0, 1):
        got = _load(two_ranks, "fsdp", rank)
        assert got["resumed_steps"] == 2  # steps 7 and 8 only: 1-6 came from the checkpoint
        for when in ("six", "eight"):
            assert got[when].keys() == one[when].keys()
            for key, value in one[when].items():
                assert torch.allclose(got[when][key], value, atol=WEIGHT_ATOL, rtol=0), (when, key)
        for name, keep in one["masks"].items():
            assert torch.equal(got["masks"][name], keep) and not keep.all()
            assert not got["eight"][name][~keep].any()  # masked weights stayed exactly zero
            assert got["eight"][name][keep].all()
    assert any(not torch.equal(one["six"][k], one["eight"][k]) for k in one["six"])  # the resumed steps trained


def test_sandwich_rule_under_ddp_trains_the_shared_weights_like_one_process(two_ranks):
    one = worker.scenario_sandwich()
    for rank in (0, 1):
        got = _load(two_ranks, "sandwich", rank)
        for key, value in one.items():
            assert torch.allclose(got[key], value, atol=WEIGHT_ATOL, rtol=0), key


def test_work_on_one_rank_inside_local_only_does_not_wait_for_the_others(two_ranks):
    assert _load(two_ranks, "local", 1)["removed"] is None
    assert _load(two_ranks, "local", 0)["removed"] == _half_choice("fisher")


# single process: the helpers are no-ops, and wrappers are refused -------------------------------
def test_helpers_are_identities_in_one_process():
    assert not is_distributed() and world_size() == 1
    values = {"a": np.arange(3.0), "b": 2}
    assert all_reduce_arrays(values) == values
    atoms = np.array([3, 1, 2])
    assert broadcast_array(atoms) is atoms


def test_a_ddp_wrapper_is_refused_naming_what_to_do():
    wrapper = nn.DataParallel(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"pass the module inside it \(model\.module\)"):
        refuse_wrapped(wrapper, "torchslim.prune_")
    with pytest.raises(TypeError, match="DataParallel wrapper"):
        torchslim.prune_(wrapper, torch.zeros(1, 4), torchslim.PruneConfig(ratio=0.5))


def test_finetune_resume_refuses_another_model(tmp_path):
    model = worker.pruned_model()
    torchslim.recovery.finetune(model, worker.loader(), max_steps=2, checkpoint_dir=tmp_path, checkpoint_every=2,
                                progress=False)
    other = worker.TinyResNet()
    with pytest.raises(ValueError, match=r"finetune_state\.pt: '.*' has shape"):
        torchslim.recovery.finetune(other, worker.loader(), max_steps=2, checkpoint_dir=tmp_path, resume=True,
                                    progress=False)
    with pytest.raises(ValueError, match="need checkpoint_dir"):
        torchslim.recovery.finetune(model, worker.loader(), resume=True, progress=False)
    with pytest.raises(ValueError, match="accumulate must be a positive"):
        torchslim.recovery.finetune(model, worker.loader(), accumulate=0, progress=False)


def test_accumulated_half_batches_step_like_the_whole_batch():
    whole, halves = worker.pruned_model(), worker.pruned_model()
    data = worker.digits()
    full = torch.utils.data.DataLoader(data, batch_size=32)
    half = torch.utils.data.DataLoader(data, batch_size=16)
    opt_whole = torch.optim.SGD(whole.parameters(), lr=0.1)
    opt_half = torch.optim.SGD(halves.parameters(), lr=0.1)
    torchslim.recovery.finetune(whole, full, max_steps=4, optimizer=opt_whole, freeze_bn=True, progress=False)
    result = torchslim.recovery.finetune(halves, half, max_steps=4, optimizer=opt_half, freeze_bn=True, accumulate=2,
                                         progress=False)
    assert result.steps == 4
    for (name, a), b in zip(whole.state_dict().items(), halves.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_bf16_autocast_trains_on_cpu():
    model = worker.pruned_model()
    before = model.head[-1].weight.detach().clone()
    result = torchslim.recovery.finetune(model, worker.loader(), max_steps=3, precision="bf16", progress=False)
    assert result.steps == 3 and np.isfinite(result.final_loss)
    assert model.head[-1].weight.dtype == torch.float32 and not torch.equal(model.head[-1].weight, before)


def test_the_readme_example_runs_under_torchrun(tmp_path):
    example = WORKER.parents[1] / "examples" / "finetune_distributed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(example), "--out", str(tmp_path), "--steps", "40", "--checkpoint-every", "10"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es): MACs 0.50 of the original" in done.stdout
    from torchslim.models.digits import DigitsCNN

    model = torchslim.load(tmp_path / "model", DigitsCNN())
    assert torchslim.io.read_metadata(tmp_path / "model")["accuracy"] > 0.5
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in DigitsCNN().parameters())
