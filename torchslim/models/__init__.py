"""Bundled example models and the one factory, ``create_model(name)``."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return register


def create_model(name: str, **kwargs: Any) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown torchslim model '{name}'; bundled: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


from torchslim.models import digits, modnet  # noqa: E402,F401  (registers)
