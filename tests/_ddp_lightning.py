"""Run by tests/test_integrations.py (not collected): AGPCallback under Lightning's DDP strategy,
two CPU processes (gloo). Lightning re-runs this script for rank 1. Each rank writes what it saw
to OUT/rank{r}.json.

    python tests/_ddp_lightning.py OUT

Both ranks train on their own batches; AGPPruner takes rank 0's choice of channels at every
mask update, so the callback's own check (sync_masks_) finds nothing to overrule.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from _ddp_shared import digest
from torchslim.integrations.lightning import AGPCallback


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) * 20).long() % 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module = Net()
    agp = AGPCallback(final_sparsity=0.5, start_step=0, total_steps=4, frequency=2, save_dir=out / "ckpt")
    trainer = pl.Trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[agp])
    trainer.fit(module, loader)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "world_size": trainer.world_size, "history": agp.history, "masks_differed": agp.driver.masks_differed,
        "widths": [module.net[0].out_channels, module.net[3].out_channels],
        "macs": [agp.result.macs_before, agp.result.macs_after], "digest": digest(module),
    }))


if __name__ == "__main__":
    main()
