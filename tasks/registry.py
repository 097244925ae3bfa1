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
from typing import Any, Callable, Generic, TypeVar

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


class Registry(Generic[T]):
    """Maps names to factories; ``get`` validates overrides before building."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            return factory

        return deco

    def names(self) -> list[str]:
        return list(self._factories)

    def factory(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            close = difflib.get_close_matches(name, self._factories, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}'.{hint} Registered: {', '.join(self._factories)}."
            )
        return self._factories[name]

    def get(self, name: str, **overrides: Any) -> T:
        factory = self.factory(name)
        check_kwargs(f"{self.kind} '{name}'", factory, overrides)
        return factory(**overrides)
