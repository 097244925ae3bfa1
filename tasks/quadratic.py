"""``quadratic``: noisy, randomly conditioned quadratic bowls.

Each instance has a random target ``c`` and per-coordinate curvatures ``h`` spread
log-uniformly over ``condition_number``; the training loss on a batch (a noise draw ``n``) is

    L(x) = 1/2 * mean_i h_i * (x_i - c_i - n_i)^2 ,

so the optimum is ``c`` and the gradient noise has standard deviation ``h * noise_std``. The
smallest useful task family: smooth, cheap, and every learned optimizer can make progress.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

import tasks
from tasks.base import check_split

_SPLIT_SALT = {"train": 0, "valid": 1, "test": 2}


@tasks.register("quadratic")
@dataclasses.dataclass(frozen=True)
class Quadratic:
    """Random quadratic bowls; see the module docstring."""

    dim: int = 10
    condition_number: float = 100.0
    noise_std: float = 0.1
    init_scale: float = 1.0
    name: ClassVar[str] = "quadratic"

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"quadratic: dim must be >= 1, got {self.dim}")
        if self.condition_number < 1:
            raise ValueError(f"quadratic: condition_number must be >= 1, got {self.condition_number}")

    def sample(self, key: jax.Array) -> dict:
        k_target, k_h = jax.random.split(key)
        half_log = 0.5 * math.log(self.condition_number)
        log_h = jax.random.uniform(k_h, (self.dim,), minval=-half_log, maxval=half_log)
        return {"target": jax.random.normal(k_target, (self.dim,)), "log_h": log_h}

    def init(self, spec: dict, key: jax.Array) -> dict:
        return {"x": self.init_scale * jax.random.normal(key, (self.dim,))}

    def loss(self, spec: dict, params: dict, batch: dict) -> tuple[jax.Array, dict]:
        h = jnp.exp(spec["log_h"])
        residual = params["x"] - spec["target"] - batch["noise"]
        return 0.5 * jnp.mean(h * residual**2), {}

    def batch(self, spec: dict, key: jax.Array, split: str) -> dict:
        check_split(split)
        key = jax.random.fold_in(key, _SPLIT_SALT[split])
        return {"noise": self.noise_std * jax.random.normal(key, (self.dim,))}
