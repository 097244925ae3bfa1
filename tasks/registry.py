"""A small name -> factory registry shared by ``tasks``, ``lopt`` and ``estimators``.

It lives in ``tasks/`` because ``tasks`` is the bottom layer of the package graph
(DESIGN.md: ``tasks/`` imports nothing from the other two), so every package may use it.

Factories are frozen dataclasses (or callables returning one). ``get(name, **overrides)``
checks every override against the factory's parameters *before* constructing anything, so
a mistyped config key fails with a message naming the key and the valid ones, long before
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import sys
from typing import Any, Callable, Generic, NamedTuple, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration names something that does not exist or has an invalid value."""


def _parameters(factory: Callable[..., Any]) -> tuple[list[str], bool]:
    """Names accepted by ``factory`` and whether it also takes ``**kwargs``."""
    if dataclasses.is_dataclass(factory):
        names = [f.name for f in dataclasses.fields(factory) if f.init]
        return names, False
    sig = inspect.signature(factory)
    names = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def check_kwargs(what: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming any key of ``kwargs`` that ``factory`` does not take."""
    names, var_kw = _parameters(factory)
    if var_kw:
        return
    for key in kwargs:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown option '{key}' for {what}.{hint} Valid options: {', '.join(sorted(names))}."
            )


def same_definition(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one definition: the same object, or the same qualified name
    from the same source file (a module imported again, or a file imported both by path and by
    module name, defines new objects from the same code); from the same module when a file is
    unknown. (Config files load under one module name, so the name alone would not do.)"""
    if a is b:
        return True
    qualname = getattr(a, "__qualname__", None)
    if qualname is None or qualname != getattr(b, "__qualname__", None):
        return False
    files = [_source_file(x) for x in (a, b)]
    if None not in files:
        return files[0] == files[1]
    return getattr(a, "__module__", None) == getattr(b, "__module__", None)


def _source_file(obj: Any) -> str | None:
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        return None
    return os.path.realpath(path) if path else None


class Origin(NamedTuple):
    """Where a name was registered: the module whose code called ``register`` and its file."""

    module: str
    file: str | None


class Registry(Generic[T]):
    """Maps names to factories; ``get`` validates overrides before building.

    A name registered again by the same definition (:func:`same_definition`: a user's module
    imported twice, by name and by path) takes the newer object; a name registered by two
    different definitions is a :class:`ConfigError` naming both. ``origin(name)`` is the module
    that registered it, so a run can record which of the user's modules it needs."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._origins: dict[str, Origin] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        caller = sys._getframe(1).f_globals  # the module registering (its top level or a function)
        origin = Origin(caller.get("__name__", "?"), caller.get("__file__"))

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            old = self._factories.get(name)
            if old is not None and not same_definition(old, factory):
                raise ConfigError(
                    f"{self.kind} '{name}' is registered twice, by {_describe(old)} and by "
                    f"{_describe(factory)}; register one of them under another name")
            self._factories[name] = factory
            self._origins[name] = origin
            return factory

        return deco

    def names(self) -> list[str]:
        return list(self._factories)

    def origin(self, name: str) -> Origin | None:
        """The module that registered ``name`` (None for an unknown name)."""
        return self._origins.get(name)

    def factory(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            close = difflib.get_close_matches(name, self._factories, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}'.{hint} Registered: {', '.join(self._factories)}"
                " (one of your own: --module=your.module)."
            )
        return self._factories[name]

    def get(self, name: str, **overrides: Any) -> T:
        factory = self.factory(name)
        check_kwargs(f"{self.kind} '{name}'", factory, overrides)
        return factory(**overrides)


def _describe(obj: Any) -> str:
    """``module.QualName (file)`` of a registered factory."""
    where = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    path = _source_file(obj)
    return f"{where} ({path})" if path else where
