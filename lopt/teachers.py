"""Hand-designed optimizers ("teachers") as plain optax transformations.

They serve as baselines (``scripts/evaluate.py`` tunes Adam's learning rate), as teachers for
imitation (Chen et al. 2020, Alg. 2), for self-improving mixing and for ELO behaviour cloning.
A teacher is named in a config as ``"adam"``, ``{"name": "adam", "learning_rate": 3e-4}`` or
``("adam", {"learning_rate": 3e-4})``; :func:`spec` turns any of these into a hashable
``(name, options)`` pair (so components holding teachers stay hashable, static jit arguments)
and :func:`build` into the optax transformation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import optax

from tasks.registry import ConfigError, check_kwargs

TEACHERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "nesterov": lambda learning_rate, momentum=0.9: optax.sgd(learning_rate, momentum, nesterov=True),
    "adagrad": optax.adagrad,
    "rmsprop": optax.rmsprop,
}

#: Learning rates for teachers named without options (small-problem defaults).
DEFAULT_LEARNING_RATES = {
    "adam": 1e-3,
    "adamw": 1e-3,
    "sgd": 0.1,
    "nesterov": 0.1,
    "adagrad": 0.1,
    "rmsprop": 1e-3,
}

#: Chen et al. 2020's teachers: Sec. 5.3, "off-policy imitation learning (IL) of analytical
#: optimizers (Adam, SGD and Adagrad)"; the same three serve self-improving, "which also take
#: Adam, SGD, and Adagrad as their auxiliary optimizers".
CHEN_TEACHERS = ("adam", "sgd", "adagrad")

TeacherSpec = tuple  # (name, ((option, value), ...)), hashable


def get(name: str, **kwargs) -> optax.GradientTransformation:
    """A teacher by name, e.g. ``get("adam", learning_rate=1e-3)``."""
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher '{name}'; choose from {', '.join(TEACHERS)}")
    check_kwargs(f"teacher '{name}'", TEACHERS[name], kwargs)
    return TEACHERS[name](**kwargs)


def spec(teacher: Any) -> TeacherSpec:
    """``"adam"``, ``{"name": "adam", "learning_rate": 3e-4}`` or ``("adam", {...})`` as a hashable
    ``(name, options)`` pair, with the default learning rate filled in; bad names or options
    raise ``ConfigError`` now, not inside jit."""
    if hasattr(teacher, "to_dict"):  # a config section (ml_collections.ConfigDict)
        teacher = teacher.to_dict()
    if isinstance(teacher, str):
        name, options = teacher, {}
    elif isinstance(teacher, Mapping):
        options = dict(teacher)
        if "name" not in options:
            raise ConfigError(f"teacher {teacher!r} needs a 'name'")
        name = options.pop("name")
    elif isinstance(teacher, (tuple, list)) and len(teacher) == 2 and isinstance(teacher[0], str):
        name, options = teacher[0], dict(teacher[1])
    else:
        raise ConfigError(f"cannot read teacher {teacher!r}; use a name or {{'name': ..., options}}")
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher '{name}'; choose from {', '.join(TEACHERS)}")
    if "learning_rate" not in options and name in DEFAULT_LEARNING_RATES:
        options["learning_rate"] = DEFAULT_LEARNING_RATES[name]
    get(name, **options)
    return (name, tuple(sorted(options.items())))


def specs(teachers: Any) -> tuple[TeacherSpec, ...]:
    """One or several teachers as a tuple of :func:`spec` pairs (at least one)."""
    if isinstance(teachers, (str, Mapping)) or (
        isinstance(teachers, tuple) and len(teachers) == 2 and isinstance(teachers[0], str)
        and isinstance(teachers[1], Mapping)
    ):
        teachers = (teachers,)
    out = tuple(spec(t) for t in teachers)
    if not out:
        raise ConfigError("at least one teacher is needed")
    return out


def build(teacher: TeacherSpec) -> optax.GradientTransformation:
    """The optax transformation of a :func:`spec` pair."""
    name, options = teacher
    return get(name, **dict(options))
