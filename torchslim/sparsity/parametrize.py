"""Masks that keep the dense weight: a ``torch.nn.utils.parametrize`` parametrisation per weight.

Hard zeroing (:class:`~torchslim.sparsity.WeightMasks`) overwrites pruned weights, so a weight
pruned by mistake is lost. Dynamic Network Surgery (Guo, Yao & Chen 2016, "Dynamic Network
Surgery for Efficient DNNs") prunes *and splices*: the network computes with ``W * T`` (``T`` a
0/1 mask) while the dense ``W`` keeps being updated, so a pruned weight can come back with
the value it learned meanwhile. Deep Compression (Han, Mao & Dally 2015) and gradual pruning
(Zhu & Gupta 2017) train under a mask as well. Here the mask is a parametrisation
(``torch.nn.utils.parametrize.register_parametrization``, see the PyTorch "Parametrizations"
tutorial)::

    mask_(model, {"conv.weight": keep})          # conv.weight now reads dense * keep
    model.conv.parametrizations.weight.original  # the dense weight, a Parameter (trained)
    update_masks_(model, {"conv.weight": keep2}) # prune more, or splice entries back
    remove_masks_(model)                          # bake: a plain model with zeros, no masks

Gradients. ``module.weight`` is ``torch.where(mask, dense, 0)``; the optimiser updates the
dense ``original``. By default (``straight_through=False``) the gradient of a masked entry is
zero, as for any product with a 0/1 mask, so masked entries keep their value (weight decay and
momentum aside). With ``straight_through=True`` the gradient with respect to the masked weight
is passed unchanged to every dense entry, masked ones included: DNS's update
``W <- W - lr * dL/d(W*T)`` (its eq. 3), which lets pruned weights keep learning and be
spliced back.

state_dict. A masked module's ``state_dict`` holds ``<module>.parametrizations.<name>.original``
(the dense weight) and ``<module>.parametrizations.<name>.0.mask`` (the bool mask) instead of
``<module>.<name>``; it loads into a model masked the same way (any mask values). Structured
pruning (``torchslim.prune_``) and checkpoints (``torchslim.save`` / ``load``) refuse a model
with live parametrisations: call :func:`remove_masks_` first.

Tied weights (one Parameter held by several modules) get one shared parametrisation, on
every module holding it, so they stay tied; a module registered under several names is
masked once.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


class _StraightThroughMask(torch.autograd.Function):
    """``where(mask, weight, 0)`` forward; the gradient passes to every entry of ``weight``."""

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class MaskParametrization(nn.Module):
    """The parametrisation ``weight -> where(mask, weight, 0)`` with a bool ``mask`` buffer.

    ``straight_through=True`` gives masked entries the gradient of the masked weight (DNS);
    ``False`` gives them zero gradient.
    """

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor, *, straight_through: bool = False) -> None:
        super().__init__()
        self.straight_through = straight_through
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.straight_through:
            return _StraightThroughMask.apply(weight, self.mask)
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"kept={kept}/{self.mask.numel()}, straight_through={self.straight_through}"


# ----------------------------------------------------------------------------------------
# public operations
# ----------------------------------------------------------------------------------------
def mask_(model: nn.Module, masks: dict[str, torch.Tensor], *, straight_through: bool = False) -> nn.Module:
    """Mask the named parameters of ``model`` in place (``{"conv.weight": keep}``, keep a bool or
    0/1 tensor of the parameter's shape); returns ``model``.

    Each parameter gets a :class:`MaskParametrization`: the model computes with the masked
    weight, the dense one stays as ``module.parametrizations.<name>.original``. Everything is
    validated before anything is registered: an unknown name, a parameter already
    parametrised, a shape mismatch or a mask with values other than 0/1 raises a
    ``ValueError`` naming the key, and the model is left untouched.
    """
    targets = {name: _plain_parameter(model, name) for name in _names(masks)}
    _refuse_split_ties(model, targets)
    checked = {name: _checked_mask(name, mask, targets[name]) for name, mask in masks.items()}
    by_param: dict[int, tuple[str, torch.Tensor]] = {}
    for name, keep in checked.items():
        other = by_param.setdefault(id(targets[name]), (name, keep))
        if other[0] != name and not torch.equal(other[1], keep):
            raise ValueError(f"'{name}' and '{other[0]}' are the same (tied) parameter but were given different masks")
    registered: list[tuple[nn.Module, str]] = []
    try:
        for name, keep in by_param.values():
            parametrization = MaskParametrization(keep, straight_through=straight_through)
            for module, attr in _holders(model, targets[name]):
                if not hasattr(module, _ORDER):
                    setattr(module, _ORDER, list(module._parameters))
                own_class(module)
                parametrize.register_parametrization(module, attr, parametrization)
                registered.append((module, attr))
    except BaseException:
        for module, attr in reversed(registered):
            _remove(module, attr, bake=False)
        raise
    return model


def update_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Give masked parameters new masks, in place (prune more, or splice entries back: a
    re-enabled entry reads its dense value again); returns ``model``. All masks are validated
    first (``ValueError`` naming the key; nothing changes on error)."""
    found = {name: _mask_parametrization(model, name) for name in _names(masks)}
    checked = {name: _checked_mask(name, mask, found[name].mask) for name, mask in masks.items()}
    with torch.no_grad():
        for name, keep in checked.items():
            found[name].mask.copy_(keep)
    return model


def set_mask_(model: nn.Module, name: str, mask: torch.Tensor) -> nn.Module:
    """Give the masked parameter ``name`` a new mask (see :func:`update_masks_`)."""
    return update_masks_(model, {name: mask})


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current masks (bool copies) by parameter name (tied parameters once, first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, _module, _attr, parametrization in _masked(model):
        if id(parametrization) not in seen:
            seen.add(id(parametrization))
            out[name] = parametrization.mask.detach().clone()
    return out


def remove_masks_(model: nn.Module, names: list[str] | None = None, *, bake: bool = True) -> nn.Module:
    """Remove the masks (all, or those of ``names``) and leave plain parameters; returns ``model``.

    ``bake=True`` writes the masked weight (zeros where masked) into the parameter; ``bake=False``
    restores the dense weight. The Parameter objects stay the same, so an optimiser keeps them.
    """
    masked = _masked(model)
    if names is not None:
        for name in names:
            _mask_parametrization(model, name)  # raises for an unknown or unmasked name
        chosen = {id(_mask_parametrization(model, name)) for name in names}
        masked = [entry for entry in masked if id(entry[3]) in chosen]
    for _name, module, attr, _parametrization in masked:
        _remove(module, attr, bake=bake)
    return model


def live_parametrizations(model: nn.Module) -> list[str]:
    """Names (``"conv.weight"``) of every tensor of ``model`` that has a live parametrisation
    (masks or any other ``torch.nn.utils.parametrize`` parametrisation)."""
    found = []
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            found += [_join(path, attr) for attr in module.parametrizations]
    return found


def parametrization_problem(model: nn.Module, action: str) -> str | None:
    """Why ``action`` (``"torchslim.save"``...) cannot run on ``model``: it has live
    parametrisations, named with what to call first; None when it has none."""
    names = live_parametrizations(model)
    if not names:
        return None
    shown = ", ".join(f"'{n}'" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{action} refuses a model with live parametrizations ({shown}): its weights are computed "
            "from parametrizations.<name>.original. Call torchslim.sparsity.remove_masks_(model) first "
            "(bake=True keeps the masked zeros); shared weights: torchslim.compress.save_compressed writes them, "
            "torchslim.compress.remove_sharing_(model) bakes them; others: "
            "torch.nn.utils.parametrize.remove_parametrizations")


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
# a masked module's parameter order before masking (a plain attribute: it survives deepcopy),
# restored when its last mask goes: parametrize re-registers the parameter last, and
# optimisers and state_dicts follow that order
_ORDER = "_torchslim_parameter_order"


def own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    ``torch.nn.utils.parametrize`` keeps each parametrized tensor as a property of a class
    made for the module, adds and deletes those properties as parametrizations come and go,
    and ``copy.deepcopy`` gives the copy that same class: changing one module's masks would
    break the other's. A copy of the class (same bases, same properties) keeps them apart.
    """
    cls = type(module)
    if parametrize.is_parametrized(module):
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _remove(module: nn.Module, attr: str, *, bake: bool) -> None:
    own_class(module)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=bake)
    if not parametrize.is_parametrized(module) and hasattr(module, _ORDER):
        order = getattr(module, _ORDER)
        delattr(module, _ORDER)
        params = module._parameters
        keys = [k for k in order if k in params] + [k for k in params if k not in order]
        module._parameters = {k: params[k] for k in keys}


def _names(masks: Any) -> list[str]:
    if not isinstance(masks, dict):
        raise ValueError(f"masks must be a dict {{parameter name: mask}}, got {type(masks).__name__}")
    for name in masks:
        if not isinstance(name, str):
            raise ValueError(f"mask key {name!r} is not a parameter name (a string)")
    return list(masks)


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        raise ValueError(f"'{name}': {type(model).__name__} has no module '{path}'") from None
    return module, attr


def _plain_parameter(model: nn.Module, name: str) -> nn.Parameter:
    module, attr = _split(model, name)
    if parametrize.is_parametrized(module, attr):
        raise ValueError(f"'{name}' is already parametrized (masked?); use update_masks_ to change its mask")
    param = module._parameters.get(attr)
    if not isinstance(param, nn.Parameter):
        kind = "a buffer" if attr in module._buffers else "not a parameter"
        raise ValueError(f"'{name}': {type(module).__name__} '{name.rpartition('.')[0]}' has no parameter "
                         f"'{attr}' ({kind})")
    return param


def _holders(model: nn.Module, param: torch.Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) that holds ``param`` as a plain parameter (a shared module once)."""
    return [(module, attr) for module in _modules(model)
            for attr, value in module._parameters.items() if value is param]


def _modules(model: nn.Module) -> list[nn.Module]:
    """Each module once; a parametrisation's own containers are not part of the model."""
    return [m for path, m in model.named_modules()
            if ".parametrizations." not in f".{path}." and not isinstance(m, MaskParametrization)]


def _refuse_split_ties(model: nn.Module, targets: dict[str, nn.Parameter]) -> None:
    """A parameter tied to one already parametrised elsewhere cannot be masked on its own."""
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations:
            original = module.parametrizations[attr].original
            for name, param in targets.items():
                if param is original:
                    raise ValueError(f"'{name}' is tied to '{_join(path, attr)}', which is already parametrized")


def _checked_mask(name: str, mask: Any, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor on ``like``'s device, after checking shape and 0/1 values."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask of '{name}' must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"mask of '{name}' has shape {list(mask.shape)}, the parameter has {list(like.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"mask of '{name}' must be boolean or hold only 0 and 1 (dtype {mask.dtype})")
    return mask.detach().to(device=like.device, dtype=torch.bool)


def _masked(model: nn.Module) -> list[tuple[str, nn.Module, str, MaskParametrization]]:
    """(name, module, attribute, mask parametrisation) of every masked tensor, in module order."""
    found = []
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations:
            for parametrization in module.parametrizations[attr]:
                if isinstance(parametrization, MaskParametrization):
                    found.append((_join(path, attr), module, attr, parametrization))
    return found


def _mask_parametrization(model: nn.Module, name: str) -> MaskParametrization:
    module, attr = _split(model, name)
    if parametrize.is_parametrized(module, attr):
        containers: Any = module.parametrizations
        for parametrization in containers[attr]:
            if isinstance(parametrization, MaskParametrization):
                return parametrization
    raise ValueError(f"'{name}' is not masked (mask it with mask_ first)")


def _join(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr
