"""Prune a digits CNN with a data-driven criterion and fine-tune it, on one process or many.

    python examples/finetune_distributed.py --out pruned/                       # a laptop
    torchrun --nproc_per_node=2 examples/finetune_distributed.py --out pruned/  # 2 processes (gloo on CPU)
    torchrun --nnodes=2 --node-rank=0 --master-addr=HOST --nproc_per_node=8 examples/finetune_distributed.py ...

Each rank reads its shard of the data (DistributedSampler); Fisher's statistics are summed over
the ranks, so every rank removes the channels one process would choose over all the data;
fine-tuning runs through DistributedDataParallel, checkpoints every --checkpoint-every steps
and, launched again after a crash, continues from the checkpoint. Rank 0 writes the result.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import torchslim
from torchslim.criteria import random_projection_loss
from torchslim.distributed import rank, world_size
from torchslim.models.digits import DigitsCNN
from torchslim.recovery import evaluate_accuracy, finetune, recalibrate_bn_


def digits(train: bool) -> TensorDataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    cut = 1400
    return TensorDataset(x[:cut], y[:cut]) if train else TensorDataset(x[cut:], y[cut:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps in all (pretraining and fine-tuning)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    args = parser.parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    train = digits(train=True)
    sampler = DistributedSampler(train, num_replicas=world_size(), rank=rank(), seed=0)
    loader = DataLoader(train, batch_size=args.global_batch // world_size(), sampler=sampler)
    model = DigitsCNN()
    finetune(model, loader, epochs=100, lr=3e-3, max_steps=args.steps // 2, progress=rank() == 0,
             checkpoint_dir=args.out / "pretrain", checkpoint_every=args.checkpoint_every, resume=True)
    original = torchslim.analyze(model, torch.zeros(1, 1, 8, 8), latency=False)
    torchslim.prune_(model, torch.zeros(1, 1, 8, 8),
                     torchslim.PruneConfig(target_macs=args.target_macs, criterion="fisher", latency_aware=False),
                     data=[batch for _, batch in zip(range(8), loader)], loss_fn=random_projection_loss())
    recalibrate_bn_(model, loader, num_batches=8)  # statistics averaged over the ranks
    finetune(model, loader, epochs=100, lr=1e-3, max_steps=args.steps - args.steps // 2, progress=rank() == 0,
             checkpoint_dir=args.out / "finetune", checkpoint_every=args.checkpoint_every, resume=True)
    if rank() == 0:
        accuracy = evaluate_accuracy(model, DataLoader(digits(train=False), batch_size=256))
        macs = torchslim.analyze(model, torch.zeros(1, 1, 8, 8), latency=False).total_macs
        torchslim.save(model, args.out / "model", metadata={"accuracy": accuracy})
        print(f"{world_size()} process(es): MACs {macs / original.total_macs:.2f} of the original, "
              f"held-out accuracy {accuracy:.3f}, saved to {args.out / 'model'}")


if __name__ == "__main__":
    main()
