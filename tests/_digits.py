"""A digits CNN trained briefly on scikit-learn's bundled digits, for tests that need a model
whose accuracy can drop (pruning, reconstruction, ADMM)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.demo import load_digits_tensors
from torchslim.models import create_model


def trained_digits_cnn(epochs: int = 8, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(the CNN in train mode, (X, Y, X_test, Y_test)), trained ``epochs`` epochs with Adam."""
    torch.manual_seed(seed)
    data = load_digits_tensors(seed=seed)
    x, y = data[0], data[1]
    model = create_model("digits_cnn")
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            optimizer.step()
    return model, data
