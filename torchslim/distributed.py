"""torchslim under ``torch.distributed`` (torchrun; DistributedDataParallel; gloo on CPU, nccl on GPU).

Every helper is a no-op in a single process, so the same script runs on a laptop and under
``torchrun --nproc_per_node=N``. What torchslim does with them:

- data-driven criteria (taylor, fisher, apoz, mean_activation) sum their statistics over the
  ranks, so N ranks over N shards choose the channels one process would over all the data;
- ``prune_`` takes rank 0's choice of channels on every rank (a latency measurement or a
  near tie can differ between machines; the choice may not);
- ``recalibrate_bn_`` averages the running statistics over the ranks, weighted by batches;
- AGP masks are rank 0's on every rank at every pruning step;
- ``recovery.finetune`` trains through DistributedDataParallel and checkpoints from rank 0.

Pruning changes parameter shapes, which DDP fixed when it wrapped the model: prune the
module (``ddp.module``), then wrap it again. :func:`refuse_wrapped` says so where torchslim
is handed the wrapper. These calls are collective: under torchrun every rank makes them; work
done on one rank only (``if rank() == 0: ...``) goes inside :func:`local_only`, which turns
the collectives off for the duration.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import numpy as np
import torch
from torch import distributed as dist
from torch import nn

K = TypeVar("K")
_LOCAL_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("torchslim_local_only", default=False)


def is_distributed() -> bool:
    """Whether a process group of more than one rank is running (and collectives are not off)."""
    return (not _LOCAL_ONLY.get() and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within it, torchslim calls on this rank alone make no collective calls (each acts as one
    process would on its own data): for work done on one rank, which would otherwise wait
    forever for the others."""
    token = _LOCAL_ONLY.set(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.reset(token)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages ``model`` or part of it."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def _device() -> torch.device:
    """Where collectives want their tensors: the current GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if is_distributed():
        buffer = tensor.to(_device())
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        if buffer is not tensor:
            tensor.copy_(buffer)
    return tensor


def all_reduce_tensors_(tensors: list[torch.Tensor]) -> None:
    """Sum every tensor over the ranks, in place, in one collective (flattened in float64)."""
    if not is_distributed() or not tensors:
        return
    require_same([tuple(t.shape) for t in tensors], "the statistics' shapes")
    flat = all_reduce_sum_(torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors]))
    for tensor, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
        tensor.copy_(piece.reshape(tensor.shape).to(tensor.device, tensor.dtype))


def all_reduce_arrays(arrays: Mapping[K, np.ndarray | float | int]) -> dict[K, Any]:
    """Sum each value (NumPy arrays and numbers, in float64) over the ranks, by key. Every rank
    must hold the same keys and shapes (``RuntimeError`` naming the first that differs)."""
    if not is_distributed():
        return dict(arrays)
    keys = list(arrays)
    require_same([(repr(k), np.shape(arrays[k])) for k in keys], "the statistics' keys and shapes")
    flat = [np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys]
    sizes = [a.size for a in flat]
    total = all_reduce_sum_(torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0))).numpy()
    pieces = np.split(total, np.cumsum(sizes)[:-1]) if sizes else []
    summed: dict[K, Any] = {}
    for key, piece in zip(keys, pieces):
        original = arrays[key]
        summed[key] = piece.reshape(np.shape(original)) if isinstance(original, np.ndarray) else type(original)(piece[0])
    return summed


def broadcast_array(array: np.ndarray, src: int = 0) -> np.ndarray:
    """Rank ``src``'s integer or float array, on every rank (its own in one process)."""
    if not is_distributed():
        return array
    kind = np.int64 if np.issubdtype(np.asarray(array).dtype, np.integer) else np.float64
    size = torch.tensor([np.asarray(array).size], dtype=torch.int64, device=_device())
    dist.broadcast(size, src)
    mine = torch.from_numpy(np.ascontiguousarray(array, dtype=kind))
    buffer = (mine if rank() == src else torch.empty(int(size), dtype=mine.dtype)).to(_device())
    dist.broadcast(buffer, src)
    return buffer.cpu().numpy().astype(kind)


def broadcast_tensors_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s, in place (booleans go as bytes)."""
    if not is_distributed():
        return
    for tensor in tensors:
        buffer = tensor.to(_device(), dtype=torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)
        dist.broadcast(buffer, src)
        tensor.copy_(buffer.to(tensor.device, tensor.dtype))


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``value`` on every rank (for small decisions, not tensors)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def require_same(value: Any, what: str) -> None:
    """``RuntimeError`` unless every rank holds the same picklable ``value`` (``what`` it is)."""
    values = gather_objects(value)
    for r, other in enumerate(values):
        if other != values[0]:
            raise RuntimeError(f"rank {r} has different {what} from rank 0; every rank must run the same model "
                               "and configuration")


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell ``loader``'s sampler the epoch (a ``DistributedSampler`` reshuffles its shard per epoch);
    nothing for a loader without one."""
    sampler_set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(sampler_set_epoch):
        sampler_set_epoch(epoch)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; ``model`` otherwise."""
    inner = model.module if is_wrapped(model) else model
    assert isinstance(inner, nn.Module)
    return inner


def is_wrapped(model: nn.Module) -> bool:
    return isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def refuse_wrapped(model: nn.Module, action: str) -> None:
    """``TypeError`` when ``model`` is a DDP/DataParallel wrapper: it fixed the parameters'
    shapes and its gradient buckets when it wrapped them, so it must not see them change."""
    if is_wrapped(model):
        raise TypeError(f"{action} was given a {type(model).__name__} wrapper: pass the module inside it "
                        f"(model.module), then wrap the pruned module again (DDP registered the parameters' "
                        "shapes when it wrapped them)")
