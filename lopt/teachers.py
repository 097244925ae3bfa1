"""Hand-designed optimizers ("teachers") as plain optax transformations.

They serve as baselines (``scripts/evaluate.py`` tunes Adam's learning rate), as teachers for
imitation (Chen et al. 2020, Alg. 2) and for ELO behaviour cloning.
"""

from __future__ import annotations

from typing import Callable

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


def get(name: str, **kwargs) -> optax.GradientTransformation:
    """A teacher by name, e.g. ``get("adam", learning_rate=1e-3)``."""
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher '{name}'; choose from {', '.join(TEACHERS)}")
    check_kwargs(f"teacher '{name}'", TEACHERS[name], kwargs)
    return TEACHERS[name](**kwargs)
