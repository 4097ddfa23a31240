"""What the two-process integration workers (tests/_ddp_hf.py, tests/_ddp_lightning.py) and
tests/test_integrations.py share; torch only, so a worker process imports it without pytest."""
from __future__ import annotations

import hashlib

import torch


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token ids (vocabulary 100) with a label from the first token."""

    def __init__(self, n: int = 64, length: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 100, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def digest(module: torch.nn.Module) -> str:
    """Of the parameters (BatchNorm's running statistics differ by rank: each sees its own batches)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
