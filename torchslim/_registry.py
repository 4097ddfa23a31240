"""One registry type behind every extension point of the library.

Op rules, module rules, module handlers, criteria and model factories are each a
:class:`Registry`: registered with ``register`` (a decorator or a direct call), looked up by
key or, for registries keyed by class, by an instance's type under one rule for subclasses
(:meth:`Registry.for_type`), and listed with :meth:`Registry.names`.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, MutableMapping
from types import BuiltinFunctionType, FunctionType
from typing import Any, Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING: Any = object()


class UnknownKeyError(KeyError):
    """A lookup of a key nobody registered; the message names the key and the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message as a repr
        return str(self.args[0]) if self.args else ""


class Registry(MutableMapping[K, V], Generic[K, V]):
    """Keys (names, classes or op objects) mapped to the values registered for them.

    * ``register(key, value)`` or ``@register(key)`` adds an entry; a key registered twice is
      refused with a ``ValueError`` naming it, unless ``replace=True``. ``registry[key] = value``
      is the same refusing registration, ``del registry[key]`` undoes one.
    * ``registry[key]`` looks a key up; an unknown key raises :class:`UnknownKeyError` (a
      ``KeyError``) naming the key and listing the known ones.
    * ``for_type(cls)`` finds the value for a class under the subclass rule: **the first class
      along ``cls.__mro__`` that is registered**, i.e. the exact type first, then its nearest
      base class in method resolution order. A subclass therefore inherits its base's entry
      until it registers its own, and the most specific registration always wins.
    * Iteration follows registration order; ``names()`` lists the keys' names, sorted.
    """

    def __init__(self, kind: str) -> None:
        """``kind`` names what is registered (``"criterion"``), for error messages."""
        self.kind = kind
        self._entries: dict[K, V] = {}

    @overload
    def register(self, key: K, *, replace: bool = False) -> Callable[[V], V]: ...

    @overload
    def register(self, key: K, value: V, *, replace: bool = False) -> V: ...

    def register(self, key: K, value: V = _MISSING, *, replace: bool = False) -> Any:
        """Register ``value`` under ``key``; without ``value``, a decorator that registers its target."""
        if value is _MISSING:
            def decorate(target: V) -> V:
                return self.register(key, target, replace=replace)

            return decorate
        if key in self._entries and not replace:
            raise ValueError(f"{self.kind} {key_name(key)!r} is already registered "
                             f"(as {key_name(self._entries[key])}); pass replace=True to replace it")
        self._entries[key] = value
        return value

    def for_type(self, cls: type, default: V | None = None) -> V | None:
        """The value of the first registered class along ``cls.__mro__`` (exact type, then nearest base)."""
        for base in cls.__mro__:
            if base in self._entries:
                return self._entries[base]
        return default

    def names(self) -> list[str]:
        """The registered keys' names (a class by its qualified name), sorted."""
        return sorted(key_name(key) for key in self._entries)

    def get(self, key: K, default: Any = None) -> Any:  # no error message built on a miss
        """The value registered under ``key``, else ``default``."""
        return self._entries.get(key, default)

    def __getitem__(self, key: K) -> V:
        if key not in self._entries:
            raise self._unknown(key)
        return self._entries[key]

    def __setitem__(self, key: K, value: V) -> None:
        self.register(key, value)

    def __delitem__(self, key: K) -> None:
        if key not in self._entries:
            raise self._unknown(key)
        del self._entries[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def _unknown(self, key: object) -> UnknownKeyError:
        return UnknownKeyError(f"unknown {self.kind} {key_name(key)!r}; known: {', '.join(self.names()) or 'none'}")

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def key_name(key: object) -> str:
    """A key as people write it: a class or function by its qualified name, else its ``str``."""
    if isinstance(key, (type, FunctionType, BuiltinFunctionType)):
        return key.__qualname__
    return str(key)
