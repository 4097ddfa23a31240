"""Bundled example models and the one factory, ``create_model(name)``."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from torchslim._registry import Registry

ModelFactory = Callable[..., nn.Module]
_REGISTRY: Registry[str, ModelFactory] = Registry("torchslim model")


def register_model(name: str, *, replace: bool = False) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make ``create_model(name, **kwargs)`` build a model with the decorated factory.

    A name registered twice is refused (``ValueError``) unless ``replace=True``.
    """
    return _REGISTRY.register(name, replace=replace)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A registered model built with ``kwargs``; an unknown name raises ``KeyError`` listing the known ones."""
    return _REGISTRY[name](**kwargs)


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return _REGISTRY.names()


from torchslim.models import digits, modnet  # noqa: E402,F401  (registers)
