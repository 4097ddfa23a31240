"""What tests/test_distributed.py runs under ``torchrun --nproc_per_node=2`` (gloo, CPU) and, for the
single-process references, in-process: every scenario is a function of the world it finds.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_distributed_worker.py OUT SCENARIO...
"""
from __future__ import annotations

import copy
import gc
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import torchslim
from torchslim.distributed import local_only, rank, world_size
from torchslim.recovery import finetune, recalibrate_bn_
from torchslim.schedules import AGPPruner

GLOBAL_BATCH = 32
SAMPLES = 320


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """A ResNet-style digits classifier: stem, two residual blocks, a wider head."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Dropout(dropout), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:SAMPLES] / 16.0, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, torch.tensor(data.target[:SAMPLES], dtype=torch.long))


def loader(shuffle: bool = False) -> DataLoader:
    """This rank's shard of the global batch (the whole batch in one process)."""
    dataset = digits()
    if world_size() == 1 and not shuffle:
        return DataLoader(dataset, batch_size=GLOBAL_BATCH)
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=7)
    return DataLoader(dataset, batch_size=GLOBAL_BATCH // world_size(), sampler=sampler)


def shard_batches(shard: int, shards: int = 2) -> list:
    """The batches of 16 that rank ``shard`` of ``shards`` gets from its DistributedSampler."""
    sampler = DistributedSampler(digits(), num_replicas=shards, rank=shard, shuffle=False)
    return list(DataLoader(digits(), batch_size=GLOBAL_BATCH // shards, sampler=sampler))


def pruned_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = TinyResNet(dropout)
    torchslim.prune_(model, torch.zeros(1, 1, 8, 8), torchslim.PruneConfig(ratio=0.25, exact_only=True))
    return model


def cross_entropy(output, batch):
    return F.cross_entropy(output, batch[1])


# scenarios ------------------------------------------------------------------------------------
def scenario_finetune() -> dict:
    """Fixed steps of a pruned model on the global batch: the trained weights."""
    model = pruned_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    finetune(model, loader(), epochs=1, max_steps=6, optimizer=optimizer, freeze_bn=True, progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scenario_fsdp(directory: Path) -> dict:
    """A pruned model sharded by FSDP2 (two ranks; whole in one process) fine-tuned with level
    masks enforced after every step, checkpointed at step 6, then resumed for two more steps."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from torchslim.sparsity.masks import WeightMasks

    def build() -> tuple[nn.Module, torch.optim.Optimizer, WeightMasks]:
        model = pruned_model()
        masks = {name: p.detach().abs() > p.detach().abs().median() for name, p in model.named_parameters()
                 if name.endswith("conv1.weight")}
        if world_size() > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world_size(),))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        weight_masks = WeightMasks(model, masks)
        weight_masks.apply_()
        weight_masks.attach(optimizer)
        return model, optimizer, weight_masks

    def full(model: nn.Module) -> dict:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().clone() for k, v in state.items()}

    model, optimizer, masks = build()
    finetune(model, loader(), max_steps=6, optimizer=optimizer, freeze_bn=True, progress=False,
             checkpoint_dir=directory, checkpoint_every=6)
    at_six = full(model)
    model, optimizer, masks = build()  # a fresh start that picks up the checkpoint
    steps_taken: list[int] = []  # training forwards (DCP's optimizer-state set-up runs a no-op step)
    model.register_forward_pre_hook(lambda *_: steps_taken.append(1))
    finetune(model, loader(), max_steps=8, optimizer=optimizer, freeze_bn=True, progress=False,
             checkpoint_dir=directory, resume=True)
    return {"six": at_six, "eight": full(model), "masks": masks.masks, "resumed_steps": len(steps_taken)}


def scenario_criteria() -> dict:
    """The channels data-driven criteria choose on this rank's shard (one process: on both shards'
    batches), and BatchNorm statistics recalibrated on them."""
    chosen = {}
    batches = shard_batches(rank()) if world_size() > 1 else shard_batches(0) + shard_batches(1)
    for criterion in ("taylor", "fisher", "apoz", "thinet"):
        model = copy.deepcopy(pruned_model())
        result = torchslim.prune_(model, torch.zeros(1, 1, 8, 8),
                                  torchslim.PruneConfig(ratio=0.5, criterion=criterion, latency_aware=False),
                                  data=batches, loss_fn=cross_entropy)
        chosen[criterion] = result.plan.removed
    model = pruned_model()
    used = recalibrate_bn_(model, batches)
    stats = {name: buf.clone() for name, buf in model.named_buffers() if "running" in name}
    return {"chosen": chosen, "bn_batches": used, "bn": stats, "reconstructed": reconstructed(batches)}


def reconstructed(batches: list) -> dict:
    """The weights ``reconstruct_`` fits (fixed and cross-validated ridge) after a 50% L1 cut."""
    original = pruned_model()
    out = {}
    for ridge in (1e-4, "auto"):
        model = copy.deepcopy(original)
        result = torchslim.prune_(model, torch.zeros(1, 1, 8, 8),
                                  torchslim.PruneConfig(ratio=0.5, latency_aware=False))
        report = torchslim.reconstruct_(model, original, batches, ridge=ridge, plan=result.plan)
        out[str(ridge)] = {"weights": {name: p.detach().clone() for name, p in model.named_parameters()},
                           "rows": report.rows, "ridges": report.ridges}
    return out


def scenario_sandwich() -> dict:
    """Slimmable training by the sandwich rule (widths 0.5-1.0, two random draws alike on every
    rank) for one epoch of the global batch: the shared weights."""
    from torchslim.slimmable import make_slimmable, train_sandwich

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    slim = make_slimmable(model, torch.zeros(1, 1, 8, 8), width_range=(0.5, 1.0), widths=(0.5, 1.0))
    train_sandwich(slim, loader(), epochs=1, lr=0.05, weight_decay=0.0, n_random=2, seed=3)
    return {k: v.detach().clone() for k, v in slim.model.state_dict().items()}


def scenario_local() -> dict:
    """Rank 0 alone prunes with a data-driven criterion (inside local_only: no collectives)."""
    removed = None
    if rank() == 0:
        with local_only():
            model = pruned_model()
            result = torchslim.prune_(model, torch.zeros(1, 1, 8, 8),
                                      torchslim.PruneConfig(ratio=0.5, criterion="fisher", latency_aware=False),
                                      data=shard_batches(0), loss_fn=cross_entropy)
            removed = result.plan.removed
    dist.barrier()
    return {"removed": removed}


def scenario_agp() -> dict:
    """AGP inside a DDP loop: every pruning step's masks, then the physically pruned weights."""
    torch.manual_seed(0)
    model = TinyResNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = AGPPruner(model, torch.zeros(1, 1, 8, 8), final_sparsity=0.5, total_steps=6, frequency=2,
                       optimizer=optimizer, config=torchslim.PruneConfig(ratio=0.5, latency_aware=False))
    net = nn.parallel.DistributedDataParallel(model) if world_size() > 1 else model
    masks = []
    for x, y in loader(shuffle=True):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        before = pruner.current
        pruner.step()
        if pruner.current != before:
            masks.append({name: mask.clone() for name, mask in pruner.masks.masks.items()})
    del net
    result = pruner.finalize()
    return {"masks": masks, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "removed": result.plan.removed}


def scenario_resume(directory: Path, crash_at: int | None) -> dict:
    """A checkpointed run (dropout on, shuffled shards, two epochs), optionally killed when the
    ``crash_at``-th batch is asked for, then continued with the same call."""
    model = pruned_model(dropout=0.3)
    torch.manual_seed(1 + rank())
    batches = loader(shuffle=True)
    if crash_at is not None:
        batches = _dying(batches, crash_at)
    result = finetune(model, batches, epochs=2, lr=1e-2, max_steps=14, progress=False, checkpoint_dir=directory,
                      checkpoint_every=4, resume=True)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": result.epoch_losses,
            "steps": result.steps}


class _dying:
    """A loader whose process dies (as a kill would) when its ``at``-th batch is asked for."""

    def __init__(self, inner: DataLoader, at: int) -> None:
        self.inner, self.at, self.served = inner, at, 0
        self.sampler = inner.sampler

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            self.served += 1
            if self.served == self.at:
                os._exit(17)
            yield batch


def main(out: Path, names: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for name in names:
            if name.startswith("resume"):
                kind, _, crash = name.partition(":")
                result = scenario_resume(out / "resume-ckpt", int(crash) if crash else None)
                name = kind
            elif name == "fsdp":
                result = scenario_fsdp(out / "fsdp-ckpt")
            else:
                result = globals()[f"scenario_{name}"]()
            torch.save(result, out / f"{name}-rank{rank()}.pt")
            del result
        # free the scenarios' DDP/FSDP objects while the process group is alive: gloo work they still
        # hold, freed only at interpreter finalization, can abort the process there (SIGABRT)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
