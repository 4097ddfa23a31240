"""Module replacements recorded in the pruning plan, so a rewritten model still saves and loads.

Structural rewrites (a block replaced by ``nn.Identity``, a convolution and its BatchNorm
folded into one convolution with a bias, as inference toolkits do) change which modules a
model has. :func:`replace_module_` swaps a module in place and appends a plan step recording
``{"type": name, "init": kwargs}``; ``torchslim.save`` writes it and ``torchslim.load``
re-creates the module from a freshly built original by calling the registered type with those
keyword arguments, then sets its weights from the checkpoint. A checkpoint never names a
Python object: only the types in the allow-list (:func:`register_replacement_type`;
``replacement_types()`` lists them) can be built, with JSON-plain arguments, so loading still
never unpickles anything.

Example (fold ``conv`` + ``bn`` at inference)::

    fused = nn.Conv2d(16, 32, 3, padding=1, bias=True)   # weights computed by the caller
    replace_module_(model, "conv", fused)                  # init derived from fused's attributes
    replace_module_(model, "bn", nn.Identity())
    torchslim.save(model, "folded/")
    torchslim.load("folded/", build_original())           # the same folded model, bit for bit
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from torchslim._registry import Registry
from torchslim.pruning.plan import PlanStep, PruningPlan, record_history, state_shapes

InitOf = Callable[[Any], dict[str, Any]]

REPLACEMENT_TYPES: Registry[str, type] = Registry("replacement type")
_INIT_OF: dict[type, InitOf] = {}  # exact type -> kwargs that rebuild a module like the one given


def register_replacement_type(cls: type, name: str | None = None, *, init_of: InitOf | None = None,
                              replace: bool = False) -> type:
    """Allow checkpoints to build ``cls`` (an ``nn.Module`` subclass) by ``name`` (default
    ``"<module>.<qualname>"``); returns ``cls``, so it also works as a plain decorator.

    ``init_of(module) -> kwargs`` derives the JSON-plain constructor kwargs of an instance, so
    :func:`replace_module_` needs no ``init=``. Only exact types are matched (a subclass is a
    different type and must be registered itself). A name or type registered twice is refused
    (``ValueError``) unless ``replace=True``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"a replacement type must be an nn.Module subclass, got {cls!r}")
    name = name if name is not None else f"{cls.__module__}.{cls.__qualname__}"
    existing = replacement_type_name(cls)
    if existing is not None and existing != name and not replace:
        raise ValueError(f"{cls.__qualname__} is already registered as replacement type {existing!r}; "
                         "pass replace=True to rename it")
    REPLACEMENT_TYPES.register(name, cls, replace=replace)
    if existing is not None and existing != name:
        del REPLACEMENT_TYPES[existing]
    if init_of is not None:
        _INIT_OF[cls] = init_of
    return cls


def replacement_types() -> list[str]:
    """The names of the module types a checkpoint may build, sorted."""
    return REPLACEMENT_TYPES.names()


def replacement_type_name(cls: type) -> str | None:
    """The name ``cls`` (exactly) is registered under, or None."""
    return next((name for name, registered in REPLACEMENT_TYPES.items() if registered is cls), None)


def replacement_init(module: nn.Module) -> dict[str, Any]:
    """The JSON-plain kwargs that rebuild a module like ``module`` (its type's ``init_of``)."""
    init_of = _INIT_OF.get(type(module))
    if init_of is None:
        raise ValueError(f"cannot derive the constructor arguments of a {type(module).__qualname__}: pass init={{...}} "
                         "(or register the type with init_of=)")
    return _json_round_trip(init_of(module), type(module).__qualname__)


def build_replacement(type_name: Any, init: Any) -> nn.Module:
    """Build the allow-listed type ``type_name`` with the JSON-plain kwargs ``init`` (CPU,
    default dtype; the global random state is left as it was). ``ValueError`` says why not."""
    if not isinstance(type_name, str) or type_name not in REPLACEMENT_TYPES:
        raise ValueError(f"type {type_name!r} is not an allowed replacement type (allowed: "
                         f"{', '.join(replacement_types())}; add one with register_replacement_type)")
    problem = plain_problem(init, "init")
    if problem is None and not isinstance(init, dict):
        problem = f"init must be an object of keyword arguments, got {type(init).__name__}"
    if problem is not None:
        raise ValueError(f"type {type_name!r}: {problem}")
    cls = REPLACEMENT_TYPES[type_name]
    try:
        with torch.random.fork_rng(devices=[]):
            module = cls(**init)
    except Exception as exc:  # noqa: BLE001 - any constructor error means these kwargs do not build it
        raise ValueError(f"type {type_name!r} cannot be built from init {init!r}: {type(exc).__name__}: {exc}") from None
    return module


def plain_problem(value: Any, where: str) -> str | None:
    """Why ``value`` is not JSON-plain data (None, bool, int, finite float, str, and lists and
    string-keyed objects of them), naming where in it; None when it is."""
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := plain_problem(v, f"{where}[{i}]"))), None)
    if isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, str):
                return f"{where} has the key {key!r}, not a string"
            if (p := plain_problem(v, f"{where}[{key!r}]")) is not None:
                return p
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value!r}, not a finite number"
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    return f"{where} is a {type(value).__name__} ({value!r:.60}), not plain JSON data"


def replace_module_(model: nn.Module, path: str, new_module: nn.Module, *,
                    init: dict[str, Any] | None = None) -> nn.Module:
    """Put ``new_module`` at ``path`` in ``model`` (in place) and record it in the model's
    pruning history; returns the module it replaced.

    ``new_module``'s type must be allow-listed (:func:`register_replacement_type`); ``init``
    are the JSON-plain kwargs that build one like it (derived from its attributes for the
    built-in types when omitted). They are checked before anything changes: a module built
    from them must have ``new_module``'s ``repr`` and state_dict names and shapes, so that
    ``torchslim.load`` re-creates it; its weights come from the checkpoint. Only ``path`` is
    replaced: another name under which the old module is registered keeps it.
    """
    return replace_modules_(model, {path: new_module}, inits={path: init} if init is not None else None)[path]


def replace_modules_(model: nn.Module, replacements: Mapping[str, nn.Module], *,
                     inits: Mapping[str, dict[str, Any]] | None = None) -> dict[str, nn.Module]:
    """Replace several modules at once, all or nothing, recorded as one plan step (see
    :func:`replace_module_`): every replacement is checked before the first is made, so a bad
    one (unlisted type, an init that does not rebuild it, a missing or overlapping path) raises
    ``ValueError`` naming its path with the model untouched. Returns the replaced modules."""
    paths = list(replacements)
    overlapping = [(a, b) for a in paths for b in paths if a != b and b.startswith(a + ".")]
    if overlapping:
        raise ValueError(f"'{overlapping[0][1]}' lies inside '{overlapping[0][0]}': replace one or the other")
    checked: dict[str, tuple[nn.Module, str, nn.Module, str, dict[str, Any]]] = {}
    for path, new_module in replacements.items():
        parent, name, old = _locate(model, path)
        type_name, init = _checked_replacement(path, new_module, (inits or {}).get(path))
        checked[path] = (parent, name, old, type_name, init)
    before = state_shapes(model)
    for path, (parent, name, _, _, _) in checked.items():
        parent._modules[name] = replacements[path]
    step = PlanStep({}, {}, {}, {path: {"type": type_name, "init": init}
                                 for path, (_, _, _, type_name, init) in checked.items()})
    record_history(model, PruningPlan([step]), shapes_before=before)
    return {path: old for path, (_, _, old, _, _) in checked.items()}


def _checked_replacement(path: str, new_module: nn.Module, init: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The allow-listed type name and JSON-plain init of a replacement, checked to rebuild it."""
    if not isinstance(new_module, nn.Module):
        raise TypeError(f"new_module must be an nn.Module, got {type(new_module).__name__}")
    type_name = replacement_type_name(type(new_module))
    if type_name is None:
        raise ValueError(f"{type(new_module).__qualname__} is not an allowed replacement type: register it with "
                         "torchslim.pruning.register_replacement_type first (a checkpoint builds only listed types)")
    if init is None:
        init = replacement_init(new_module)
    problem = plain_problem(init, "init")
    if problem is not None or not isinstance(init, dict):
        raise ValueError(f"replacing '{path}' by {type_name}: {problem or 'init must be a dict of keyword arguments'}")
    init = _json_round_trip(init, type_name)  # what a checkpoint will hold (tuples become lists)
    _check_rebuilds(path, type_name, init, new_module)
    return type_name, init


def _locate(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must name a submodule (the model itself cannot be replaced), got {path!r}")
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no module '{parent_path}' (replacing '{path}')") from None
    old = parent._modules.get(name)
    if old is None:
        raise ValueError(f"{type(model).__name__} has no module '{path}' to replace")
    return parent, name, old


def _check_rebuilds(path: str, type_name: str, init: dict[str, Any], module: nn.Module) -> None:
    """A module built from ``init`` must look like ``module`` (repr, state_dict names and shapes)."""
    try:
        probe = build_replacement(type_name, init)
    except ValueError as exc:
        raise ValueError(f"replacing '{path}': {exc}") from None
    built = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if built != given or repr(probe) != repr(module):
        differs = sorted(k for k in set(built) | set(given) if built.get(k) != given.get(k))
        raise ValueError(f"replacing '{path}': {type_name}(**{init}) does not rebuild the module given "
                         f"({'state_dict differs at ' + ', '.join(differs) if differs else repr(probe) + ' vs ' + repr(module)}); "
                         "pass the init= that constructs it")


def _json_round_trip(init: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(init, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the init of {what} is not JSON data: {exc}") from None


# built-in types --------------------------------------------------------------------------
def _conv_init(m: Any) -> dict[str, Any]:
    init = {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
            "padding_mode": m.padding_mode}
    if m.transposed:
        init["output_padding"] = list(m.output_padding)
    return init


def _norm_init(m: Any) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


def _layer_norm_init(m: Any) -> dict[str, Any]:
    init = {"normalized_shape": list(m.normalized_shape), "eps": m.eps, "elementwise_affine": m.elementwise_affine}
    if m.elementwise_affine:
        init["bias"] = m.bias is not None
    return init


def _inplace(m: Any) -> dict[str, Any]:
    return {"inplace": m.inplace}


def _nothing(m: Any) -> dict[str, Any]:
    return {}


_BUILT_INS: list[tuple[type, InitOf]] = [
    (nn.Identity, _nothing),
    (nn.Conv1d, _conv_init), (nn.Conv2d, _conv_init), (nn.Conv3d, _conv_init),
    (nn.ConvTranspose1d, _conv_init), (nn.ConvTranspose2d, _conv_init), (nn.ConvTranspose3d, _conv_init),
    (nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}),
    (nn.BatchNorm1d, _norm_init), (nn.BatchNorm2d, _norm_init), (nn.BatchNorm3d, _norm_init),
    (nn.LayerNorm, _layer_norm_init),
    (nn.ReLU, _inplace), (nn.ReLU6, _inplace), (nn.SiLU, _inplace), (nn.Hardswish, _inplace),
    (nn.Hardsigmoid, _inplace), (nn.GELU, lambda m: {"approximate": m.approximate}),
    (nn.LeakyReLU, lambda m: {"negative_slope": m.negative_slope, "inplace": m.inplace}),
    (nn.Sigmoid, _nothing), (nn.Tanh, _nothing),
    (nn.Dropout, lambda m: {"p": m.p, "inplace": m.inplace}),
    (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
]
for _cls, _init_of in _BUILT_INS:
    register_replacement_type(_cls, f"torch.nn.{_cls.__name__}", init_of=_init_of)
