"""Dynamic Network Surgery (Guo, Yao & Chen, NeurIPS 2016, "Dynamic Network Surgery for
Efficient DNNs"): prune and splice during training.

Each chosen layer ``k`` computes with ``W_k * T_k``; the mask ``T_k`` comes from two thresholds
``a_k < b_k`` (the paper's eq. 4): a weight whose magnitude falls below ``a_k`` is pruned
(``T = 0``), one that rises to ``b_k`` or above is spliced back (``T = 1``), in between the
mask stays as it is. As in the authors' released code, ``t_k = max(mean|W_k| + c * std|W_k|, 0)``
from the layer's weights when the surgery starts (``std`` the population standard deviation)
and ``a_k = (1 - margin) t_k``, ``b_k = (1 + margin) t_k`` (margin 0.1). The dense ``W`` keeps
learning under the mask: the gradient of the masked weight reaches every entry (eq. 3), pruned
ones included, so a weight pruned by mistake can grow back past ``b_k``. This uses
:func:`torchslim.sparsity.mask_` with ``straight_through=True``. The masks are updated at
iteration ``i`` with probability ``(1 + gamma * i) ** -power`` (the paper's ``sigma(iter)``,
Caffe's "inv" schedule), so surgery settles as training goes on.

The paper's fixed thresholds do not say where the sparsity ends: weights grow and shrink under
training (with ``sparsity=0.9`` set once from the starting quantile, LeNet-like layers ended near
85%). ``sparsity=`` therefore *aims* at a per-layer sparsity instead: at every mask update the
thresholds are recomputed from the current ``|W_k|`` so that the layer has exactly that fraction
pruned after the update, keeping the paper's gap as the ratio ``b_k / a_k = (1 + margin) / (1 - margin)``.
With that ratio the rule "prune below ``a``, splice at ``b``, else keep the mask" is "keep where
``e >= a``" for the score ``e = |w|`` of a kept weight and ``|w| * a / b`` of a pruned one, so
``a_k`` is the score at the target rank: pruned weights still come back when they outgrow the
kept ones by the margin, and the layer's sparsity equals the target (ties aside)::

    surgery = NetworkSurgery(model, c=1.0)          # or sparsity=0.9 / {"conv": 0.8, "fc1": 0.95}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)   # after: the dense W is re-registered
    for x, y in batches:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        surgery.step()
    masks = surgery.finalize()   # plain model with zeros; masks.attach(optimizer) keeps them at zero
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping

import torch
from torch import nn

from torchslim.compress.sharing import TYPE_KEYS
from torchslim.sparsity import WeightMasks, mask_, masks_of, remove_masks_, update_masks_


@dataclasses.dataclass
class SurgeryLayer:
    """Thresholds of one layer: prune below ``a``, splice at ``b`` or above (``target``: the
    sparsity the thresholds are recomputed for at each update; None: the paper's fixed ones)."""

    name: str
    c: float
    a: float
    b: float
    target: float | None = None


class NetworkSurgery:
    """Prune-and-splice masks on the Conv/Linear weights of ``model``, updated by :meth:`step`.

    ``c``: a float, or a dict with ``"conv"``, ``"linear"`` and module-name keys (a name beats a
    type; layers no key matches are left alone), the multiple of ``std|W|`` in the threshold
    (the paper's rule, fixed thresholds). ``sparsity``: aim at that fraction of pruned weights per
    layer instead (a float for the layers ``c`` chooses, or a dict keyed like ``c`` that chooses
    the layers itself): the thresholds follow the weights, see the module docstring; ``c`` is
    then only reported. ``margin`` sets ``a_k, b_k = (1 -/+ margin) t_k``; ``gamma`` and
    ``power`` the update probability; ``seed`` the draws. The masks are registered at once (a ``ValueError`` naming the weight, and nothing
    changed, when one is already parametrised): build the optimiser afterwards.
    """

    def __init__(self, model: nn.Module, c: float | Mapping[str, float] = 1.0, *,
                 sparsity: float | Mapping[str, float] | None = None,
                 margin: float = 0.1, gamma: float = 1e-4, power: float = 1.0, seed: int = 0) -> None:
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"NetworkSurgery: margin must be in [0, 1), got {margin}")
        if gamma < 0 or power < 0:
            raise ValueError(f"NetworkSurgery: gamma and power must be >= 0, got {gamma} and {power}")
        self.model, self.margin, self.gamma, self.power = model, margin, gamma, power
        self.iteration = 0
        self.decisions: list[bool] = []
        self.finalized = False
        self._generator = torch.Generator().manual_seed(seed)
        if isinstance(sparsity, Mapping):
            chosen = _chosen(model, sparsity, "sparsity")
            targets: dict[str, float | None] = {name: value for name, _, value in chosen}
        else:
            chosen = _chosen(model, c, "c")
            targets = {name: None if sparsity is None else float(sparsity) for name, _, _ in chosen}
        for name, target in targets.items():
            if target is not None and not 0.0 < target < 1.0:
                raise ValueError(f"NetworkSurgery: sparsity must be in (0, 1), got {target} for '{name}'")
        self.layers: dict[str, SurgeryLayer] = {}
        masks = {}
        for name, weight, value in chosen:
            magnitude = weight.detach().abs()
            target = targets[name]
            if target is None:
                t = max(_mean_plus_c_std(magnitude, value), 0.0)
                self.layers[name] = SurgeryLayer(name, value, (1 - margin) * t, (1 + margin) * t)
                masks[name] = magnitude >= self.layers[name].a
            else:
                self.layers[name] = SurgeryLayer(name, 0.0, 0.0, 0.0, target)
                masks[name] = self._aim(self.layers[name], magnitude, torch.ones_like(magnitude, dtype=torch.bool))
        mask_(model, masks, straight_through=True)

    def probability(self, iteration: int) -> float:
        """Probability that the masks are updated at ``iteration``: ``(1 + gamma * iteration) ** -power``."""
        return float((1.0 + self.gamma * iteration) ** -self.power)

    @torch.no_grad()
    def step(self) -> bool:
        """One training iteration: with :meth:`probability` of the iteration, prune the weights below
        ``a_k`` and splice those at ``b_k`` or above; returns whether the masks were updated."""
        if self.finalized:
            raise RuntimeError("NetworkSurgery.step after finalize(): the masks are fixed")
        draw = float(torch.rand((), generator=self._generator))
        update = draw < self.probability(self.iteration)
        self.decisions.append(update)
        self.iteration += 1
        if update:
            self.update_masks()
        return update

    @torch.no_grad()
    def update_masks(self) -> None:
        """Apply the paper's ``h_k`` now: ``T = 0`` where ``|W| < a_k``, ``1`` where ``|W| >= b_k``."""
        current = masks_of(self.model)
        new = {}
        for name, layer in self.layers.items():
            magnitude = self.dense(name).detach().abs()
            if layer.target is not None:
                new[name] = self._aim(layer, magnitude, current[name])
            else:
                new[name] = (current[name] & (magnitude >= layer.a)) | (magnitude >= layer.b)
        update_masks_(self.model, new)

    def _aim(self, layer: SurgeryLayer, magnitude: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The mask of the paper's rule with ``a``, ``b = ratio * a`` set so that exactly
        ``round(target * numel)`` weights are pruned; updates ``layer``'s thresholds (and its ``c``)."""
        ratio = (1 + self.margin) / (1 - self.margin)
        score = torch.where(kept.to(magnitude.device), magnitude, magnitude / ratio).flatten()
        keep = score.numel() - int(round(float(layer.target or 0.0) * score.numel()))
        mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        if keep > 0:
            order = torch.argsort(score, descending=True, stable=True)
            mask[order[:keep]] = True
            layer.a = float(score[order[keep - 1]])
        else:
            layer.a = float(score.max()) * ratio + 1.0  # above every score: everything pruned
        layer.b = layer.a * ratio
        std = float(magnitude.double().std(correction=0))
        t = layer.a / (1 - self.margin)
        layer.c = (t - float(magnitude.double().mean())) / std if std > 0 else 0.0
        return mask.reshape(magnitude.shape)

    def dense(self, name: str) -> torch.Tensor:
        """The dense (unmasked) weight ``name`` that keeps learning under the mask."""
        path, _, attr = name.rpartition(".")
        module: Any = self.model.get_submodule(path) if path else self.model
        return module.parametrizations[attr].original

    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks (bool copies) of the layers in surgery."""
        current = masks_of(self.model)
        return {name: current[name] for name in self.layers}

    def sparsity(self) -> float:
        """Fraction of the weights in surgery that are pruned now."""
        masks = self.masks()
        total = sum(mask.numel() for mask in masks.values())
        return 1.0 - sum(int(mask.sum()) for mask in masks.values()) / max(total, 1)

    def finalize(self, *, bake: bool = True) -> WeightMasks:
        """Stop the surgery and fix the masks; returns them as :class:`~torchslim.sparsity.WeightMasks`.

        ``bake=True`` (default) removes the mask parametrisations and leaves plain weights with
        zeros where pruned (ready for ``share_weights_`` or ``save_sparse``; ``masks.attach(optimizer)``
        keeps them at zero while fine-tuning). ``bake=False`` keeps the masks as parametrisations
        without the straight-through gradient, so the pruned weights stop learning.
        """
        masks = self.masks()
        if bake:
            remove_masks_(self.model, list(self.layers), bake=True)
        else:
            for name in self.layers:
                path, _, attr = name.rpartition(".")
                module: Any = self.model.get_submodule(path) if path else self.model
                for parametrization in module.parametrizations[attr]:
                    if hasattr(parametrization, "straight_through"):
                        parametrization.straight_through = False
        self.finalized = True
        return WeightMasks(self.model, masks)


def _mean_plus_c_std(magnitude: torch.Tensor, c: float) -> float:
    """``mean + c * std`` of the magnitudes (population std), in float64."""
    values = magnitude.double().flatten()
    return float(values.mean()) + c * float(values.std(correction=0))


def _chosen(model: nn.Module, c: float | Mapping[str, float], what: str = "c"
            ) -> list[tuple[str, torch.Tensor, float]]:
    """(weight name, weight, value) of each layer in surgery, from a ``c`` or ``sparsity`` spec."""
    spec: Mapping[str, float] = c if isinstance(c, Mapping) else dict.fromkeys(TYPE_KEYS, c)
    for key, value in spec.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"NetworkSurgery: {what} for '{key}' must be a number, got {value!r}")
    names = {key: float(value) for key, value in spec.items() if key not in TYPE_KEYS}
    chosen: list[tuple[str, torch.Tensor, float]] = []
    matched: set[str] = set()
    for path, module in model.named_modules():
        if ".parametrizations." in f".{path}.":
            continue
        hits = [key for key in names if fnmatch.fnmatchcase(path, key)]
        matched.update(hits)
        layer_c: float | None = names[hits[0]] if hits else next(
            (float(spec[key]) for key, types in TYPE_KEYS.items() if key in spec and isinstance(module, types)), None)
        if layer_c is None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(f"NetworkSurgery: '{path}' ({type(module).__name__}) has no floating-point weight")
        chosen.append((f"{path}.weight" if path else "weight", weight, layer_c))
    unmatched = sorted(set(names) - matched)
    if unmatched:
        raise ValueError(f"NetworkSurgery: no module matches {', '.join(repr(k) for k in unmatched)}")
    if not chosen:
        raise ValueError("NetworkSurgery: no layer to operate on (keys: 'conv', 'linear' or module names)")
    return chosen
