"""Trained weight sharing (Deep Compression, Han, Mao & Dally, ICLR 2016, section 3).

``share_weights_`` clusters the non-zero weights of each chosen layer with k-means
(:func:`~torchslim.compress.kmeans.kmeans_1d`, ``2**bits`` clusters) and replaces every weight
by its centroid. The layer then holds a *codebook* (the centroids, a trainable Parameter) and
an *index* per weight, as a ``torch.nn.utils.parametrize`` parametrisation::

    share_weights_(model, bits={"conv": 8, "linear": 5})
    model.fc.weight                               # codebook[index], zeros where pruned
    model.fc.parametrizations.weight.original     # the codebook: 2**bits trainable centroids
    model.fc.parametrizations.weight[0].index     # int64 index per weight (2**bits = pruned)

Fine-tuning. ``weight = cat([codebook, 0])[index]`` is an indexing operation, so autograd
sums the gradients of all the weights of a cluster into its centroid, which is the paper's
centroid update (its eq. 3); the pruned weights read a constant zero and stay zero. Build the
optimiser *after* sharing: the codebook is a new Parameter. ``state_dict`` holds
``<layer>.parametrizations.weight.original`` (codebook) and ``...weight.0.index``; it loads into a
model shared the same way. ``save_compressed`` writes the Huffman-coded file and
``remove_sharing_`` bakes the shared weights back into plain parameters.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.compress.kmeans import INITS, kmeans_1d
from torchslim.sparsity import parametrization_problem
from torchslim.sparsity.parametrize import own_class

#: the largest index width: 2**16 clusters
MAX_BITS = 16
#: type keys accepted in ``bits`` dicts and the modules they select
TYPE_KEYS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "linear": (nn.Linear,),
}


class WeightSharing(nn.Module):
    """Parametrisation ``codebook -> cat([codebook, 0])[index]``: every weight reads its centroid,
    index ``len(codebook)`` reads a constant zero (a pruned weight)."""

    index: torch.Tensor

    def __init__(self, index: torch.Tensor, codebook: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.detach().to(torch.long).clone())
        self._initial: torch.Tensor | None = codebook.detach().clone()
        self._clusters = codebook.numel()

    @property
    def clusters(self) -> int:
        """Number of centroids (``2**bits``)."""
        return int(self._clusters)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        table = torch.cat([codebook, codebook.new_zeros(1)])
        return table[self.index]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The codebook for ``weight``: the one given at construction the first time (registration),
        afterwards the mean of each cluster's weights (assigning ``module.weight = w``)."""
        if self._initial is not None:
            codebook, self._initial = self._initial, None
            return codebook.to(dtype=weight.dtype, device=weight.device)
        k = self.clusters
        flat = weight.detach().flatten()
        sums = torch.zeros(k + 1, dtype=weight.dtype, device=weight.device).index_add_(0, self.index.flatten(), flat)
        counts = torch.bincount(self.index.flatten(), minlength=k + 1).to(weight.dtype)
        return (sums / counts.clamp(min=1))[:k]

    def extra_repr(self) -> str:
        kept = int((self.index < self.clusters).sum())
        return f"clusters={self.clusters}, kept={kept}/{self.index.numel()}"


@dataclasses.dataclass
class SharedLayer:
    """What ``share_weights_`` did to one layer."""

    name: str
    bits: int
    kept: int
    total: int
    init: str

    @property
    def clusters(self) -> int:
        return 2 ** self.bits


def share_weights_(model: nn.Module, bits: int | Mapping[str, int], *, init: str = "linear", max_iter: int = 100,
                   seed: int = 0) -> list[SharedLayer]:
    """Share the weights of the chosen layers of ``model`` in place; returns what was done per layer.

    ``bits``: an int (every Conv/Linear layer) or a dict whose keys are ``"conv"``, ``"linear"``
    or module names / globs (``{"conv": 8, "linear": 5, "fc3": 4}``: a name beats a type; layers
    no key matches are left alone). Each layer's non-zero weights are clustered into
    ``2**bits`` centroids by k-means (``init`` = ``linear`` (default, the paper's best),
    ``density`` or ``random`` seeded by ``seed``), zeros stay zero. Everything is checked and
    clustered before the model is changed: bits outside [1, 16], a layer with fewer distinct
    non-zero weights than clusters, a weight that is already parametrised (masked: call
    ``torchslim.sparsity.remove_masks_`` first) or tied between layers raise a ``ValueError``
    naming the layer, and the model is left untouched.
    """
    if init not in INITS:
        raise ValueError(f"share_weights_: init must be one of {', '.join(INITS)}, got {init!r}")
    layers = _chosen_layers(model, bits)
    generator = torch.Generator().manual_seed(seed)
    planned = []
    for name, module, layer_bits in layers:
        index, codebook = _cluster(f"{name}.weight", _weight(module), layer_bits, init, max_iter, generator)
        planned.append((name, module, layer_bits, index, codebook))
    done = []
    registered: list[nn.Module] = []
    try:
        for name, module, layer_bits, index, codebook in planned:
            own_class(module)
            parametrize.register_parametrization(module, "weight", WeightSharing(index, codebook))
            registered.append(module)
            kept = int((index < codebook.numel()).sum())
            done.append(SharedLayer(f"{name}.weight", layer_bits, kept, index.numel(), init))
    except BaseException:
        for module in reversed(registered):
            own_class(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        raise
    return done


def sharing_of(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"fc.weight": (codebook, index)}`` (detached copies) for every shared weight of ``model``.

    A model without shared weights (no codebooks: never shared, or a fresh model) raises a
    ``ValueError`` saying to call ``share_weights_`` or ``load_compressed(..., shared=True)``.
    """
    found = {}
    for name, module in _shared_modules(model):
        containers: Any = module.parametrizations
        codebook = containers["weight"].original.detach().clone()
        found[name] = (codebook, cast(WeightSharing, _sharing(module)).index.detach().clone())
    if not found:
        raise ValueError(f"{type(model).__name__} has no shared weights (no codebooks): call "
                         "torchslim.compress.share_weights_(model, bits) first, or "
                         "load_compressed(path, model, shared=True)")
    return found


def restore_sharing_(model: nn.Module, sharing: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Share the weights of ``model`` with the given codebooks and indices (``{"fc.weight":
    (codebook, index)}``, as :func:`sharing_of` returns), in place; checked first, then applied."""
    checked = []
    for key, (codebook, index) in sharing.items():
        module = _plain_weight_module(model, key)
        weight = _weight(module)
        if tuple(index.shape) != tuple(weight.shape):
            raise ValueError(f"'{key}': index has shape {list(index.shape)}, the weight has {list(weight.shape)}")
        if codebook.dim() != 1 or index.numel() and (int(index.min()) < 0 or int(index.max()) > codebook.numel()):
            raise ValueError(f"'{key}': index values must lie in [0, {codebook.numel()}] for a 1-D codebook")
        checked.append((module, index.to(weight.device), codebook.to(weight.device, weight.dtype)))
    for module, index, codebook in checked:
        own_class(module)
        parametrize.register_parametrization(module, "weight", WeightSharing(index, codebook))
    return model


def remove_sharing_(model: nn.Module) -> nn.Module:
    """Bake every shared weight into a plain Parameter (``codebook[index]``) and drop the codebooks."""
    for _name, module in _shared_modules(model):
        own_class(module)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def is_shared(module: nn.Module) -> bool:
    """Whether ``module.weight`` is shared (a :class:`WeightSharing` parametrisation)."""
    return _sharing(module) is not None


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _sharing(module: nn.Module) -> WeightSharing | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    containers: Any = module.parametrizations
    for parametrization in containers["weight"]:
        if isinstance(parametrization, WeightSharing):
            return parametrization
    return None


def _shared_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{path}.weight" if path else "weight", module) for path, module in model.named_modules()
            if ".parametrizations." not in f".{path}." and _sharing(module) is not None]


def check_bits(key: str, bits: Any) -> int:
    """``bits`` as an int in [1, 16], else a ``ValueError`` naming ``key``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits for '{key}' must be an integer in [1, {MAX_BITS}], got {bits!r}")
    return bits


def _chosen_layers(model: nn.Module, bits: int | Mapping[str, int]) -> list[tuple[str, nn.Module, int]]:
    """(name, module, bits) of each layer to share, after checking the ``bits`` spec."""
    if isinstance(bits, Mapping):
        spec = {str(key): check_bits(str(key), value) for key, value in bits.items()}
    else:
        spec = {key: check_bits("every layer", bits) for key in TYPE_KEYS}
    names = {key: value for key, value in spec.items() if key not in TYPE_KEYS}
    chosen = []
    matched: set[str] = set()
    all_types = tuple(t for types in TYPE_KEYS.values() for t in types)
    for path, module in model.named_modules():
        if ".parametrizations." in f".{path}.":
            continue
        hits = [key for key in names if fnmatch.fnmatchcase(path, key)]
        matched.update(hits)
        layer_bits = names[hits[0]] if hits else next(
            (spec[key] for key, types in TYPE_KEYS.items() if key in spec and isinstance(module, types)), None)
        if layer_bits is None:
            continue
        if not isinstance(module, all_types) and not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(f"share_weights_: '{path}' ({type(module).__name__}) has no weight to share")
        chosen.append((path, _plain_weight_module(model, f"{path}.weight" if path else "weight"), layer_bits))
    unmatched = sorted(set(names) - matched)
    if unmatched:
        raise ValueError(f"share_weights_: no module matches {', '.join(repr(k) for k in unmatched)}")
    if not chosen:
        raise ValueError("share_weights_: no layer matches bits (keys: 'conv', 'linear' or module names)")
    weights = [id(_weight(module)) for _, module, _ in chosen]
    for (name, _, _), wid in zip(chosen, weights):
        if weights.count(wid) > 1:
            raise ValueError(f"share_weights_: '{name}.weight' is tied to another layer's weight; tied weights "
                             "are not supported")
    return chosen


def _plain_weight_module(model: nn.Module, key: str) -> nn.Module:
    """The module holding ``key`` (``"fc.weight"``) as a plain Parameter, else a ``ValueError``."""
    path = key.rpartition(".")[0]
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        raise ValueError(f"'{key}': {type(model).__name__} has no module '{path}'") from None
    if parametrize.is_parametrized(module, "weight"):
        problem = parametrization_problem(module, f"weight sharing of '{key}'") or ""
        raise ValueError(problem.replace("'weight'", f"'{key}'") or f"'{key}' is already parametrized")
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        raise ValueError(f"'{key}': {type(module).__name__} has no weight Parameter")
    return module


def _cluster(key: str, weight: torch.Tensor, bits: int, init: str, max_iter: int,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, codebook) for one weight: k-means over its non-zero entries; zeros get index 2**bits."""
    if not weight.is_floating_point():
        raise ValueError(f"'{key}': weight sharing needs a floating-point weight, got {weight.dtype}")
    k = 2 ** bits
    flat = weight.detach().flatten()
    nonzero = flat != 0
    values = flat[nonzero]
    distinct = int(torch.unique(values).numel())
    if distinct < k:
        raise ValueError(f"'{key}' has {distinct} distinct non-zero weights, fewer than the {k} clusters of "
                         f"bits={bits}: " + (f"use bits <= {distinct.bit_length() - 1} for this layer" if distinct >= 2
                                             else "leave this layer out of bits"))
    centroids, labels = kmeans_1d(values, k, init=init, max_iter=max_iter, generator=generator)
    index = torch.full((flat.numel(),), k, dtype=torch.long, device=flat.device)
    index[nonzero] = labels.to(flat.device)
    return index.view_as(weight), centroids.to(dtype=weight.dtype, device=weight.device)
