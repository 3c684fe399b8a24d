"""Name -> factory registries (timm's ``register_model``, in one small class): models, classifiers, attacks, defences.

    >>> MODELS = Registry("TRN variant")
    >>> @MODELS.register("trn_small_28")
    ... def trn_small_28(**overrides) -> TRN:
    ...     '''1x28x28 images, width 16, 3 levels.'''
    ...     return TRN(TRNConfig(**{"width": 16, **overrides}))
    >>> MODELS.create("trn_small_28", two_stream=False)
    >>> MODELS.list()                 # public names, sorted
    ['trn_small_28']
    >>> MODELS.create("trn_big")      # ConfigError: unknown TRN variant 'trn_big'; available: ['trn_small_28']

A factory registered with ``public=False`` (a test-only variant) can be created by name but is left out of
:meth:`Registry.list` and of the error message's listing; ``list(include_private=True)`` shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from trn.errors import ConfigError

__all__ = ["Registry", "RegistryEntry"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RegistryEntry(Generic[T]):
    """One registered factory: its name, the callable, whether it is listed, and its one-line description."""

    name: str
    factory: Callable[..., T]
    public: bool = True

    @property
    def doc(self) -> str:
        """The first line of the factory's docstring ('' if it has none)."""
        return (self.factory.__doc__ or "").strip().split("\n", 1)[0]


class Registry(Generic[T]):
    """A named collection of factories of one kind (``kind`` appears in error messages).

    Args:
        kind: what is registered, singular, e.g. ``"attack"`` or ``"TRN variant"``.
        normalize: maps a user-given name to the key (default: lower case, ``-`` as ``_``).
    """

    def __init__(self, kind: str, normalize: Callable[[str], str] | None = None) -> None:
        self.kind = kind
        self._normalize = normalize or (lambda name: name.lower().replace("-", "_"))
        self._entries: dict[str, RegistryEntry[T]] = {}

    def register(self, name: str | None = None, *, public: bool = True) -> Callable[[F], F]:
        """Decorator: register ``factory`` under ``name`` (default: the factory's ``__name__``); returns it unchanged.

        Args:
            name: registry key (normalised).
            public: False keeps the entry out of :meth:`list` (test-only variants); it can still be created.

        Raises:
            ConfigError: ``name`` is already registered (two factories for one name is always a mistake).
        """

        def deco(factory: F) -> F:
            self.add(name or factory.__name__, factory, public=public)
            return factory

        return deco

    def add(self, name: str, factory: Callable[..., T], *, public: bool = True) -> None:
        """Register ``factory`` under ``name`` without a decorator (e.g. a class, or a ``functools.partial``)."""
        key = self._normalize(name)
        if key in self._entries:
            raise ConfigError(f"{self.kind} {key!r} is already registered")
        self._entries[key] = RegistryEntry(key, factory, public)

    def update(self, factories: dict[str, Callable[..., T]], *, public: bool = True) -> None:
        """Register every ``name: factory`` of a mapping (like ``dict.update``, but a name taken twice is an error)."""
        for name, factory in factories.items():
            self.add(name, factory, public=public)

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the entry ``name`` with ``kwargs``.

        Raises:
            ConfigError: unknown name (the message lists the public names) or arguments the factory rejects.
        """
        entry = self.get(name)
        try:
            return entry.factory(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad arguments for {self.kind} {name!r}: {e}") from e

    def get(self, name: str) -> RegistryEntry[T]:
        """The entry for ``name``; :class:`ConfigError` (listing the public names) if there is none."""
        key = self._normalize(str(name))
        if key not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {self.list()}")
        return self._entries[key]

    def list(self, include_private: bool = False) -> list[str]:
        """Registered names, sorted; test-only (``public=False``) entries only with ``include_private``."""
        return sorted(k for k, e in self._entries.items() if e.public or include_private)

    def describe(self) -> dict[str, str]:
        """Public name -> first docstring line (for ``--help`` texts and docs)."""
        return {k: self._entries[k].doc for k in self.list()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalize(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
