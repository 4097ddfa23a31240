"""Compact storage of sparse weights: non-zero values plus int32 flat indices in safetensors.

Dense tensors are stored as they are; a tensor is stored sparse only when that is smaller.
Loading never unpickles (safetensors + a JSON header)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

SPARSE_SUFFIXES = (".values", ".indices")


def save_sparse(model: nn.Module, path: str | Path) -> dict[str, int]:
    """Write the state_dict with sparse tensors compacted; returns byte counts (dense vs written)."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    dense_bytes = 0
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().contiguous().cpu()
        dense_bytes += tensor.numel() * tensor.element_size()
        nonzero = tensor.flatten().nonzero().flatten()
        if tensor.is_floating_point() and nonzero.numel() * (tensor.element_size() + 4) < tensor.numel() * tensor.element_size():
            tensors[name + ".values"] = tensor.flatten()[nonzero].clone()
            tensors[name + ".indices"] = nonzero.to(torch.int32)
            shapes[name] = list(tensor.shape)
        else:
            tensors[name] = tensor.clone()
    path = Path(path)
    save_file(tensors, str(path), metadata={"torchslim.sparse": json.dumps(shapes)})
    return {"dense_bytes": dense_bytes, "file_bytes": path.stat().st_size}


def load_sparse(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``save_sparse`` file into ``model`` (strict key and shape check)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        shapes = json.loads((handle.metadata() or {}).get("torchslim.sparse", "{}"))
    stored = load_file(str(path))
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        dense = torch.zeros(torch.Size(shape).numel(), dtype=stored[name + ".values"].dtype)
        dense[stored[name + ".indices"].long()] = stored[name + ".values"]
        state[name] = dense.view(shape)
    state.update({k: v for k, v in stored.items() if not k.endswith(SPARSE_SUFFIXES) or k.rsplit(".", 1)[0] not in shapes})
    model.load_state_dict(state, strict=True)
    return model
