"""Tiny task families and learned optimizers whose meta-objectives are known in closed form."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class FixedQuadratic:
    """One fixed instance: loss(x) = 1/2 mean_i h_i (x_i - c_i)^2, x0 fixed; no batch noise."""

    h: tuple[float, ...] = (1.0, 0.5, 2.0)
    c: tuple[float, ...] = (1.0, -1.0, 0.5)
    x0: tuple[float, ...] = (0.0, 0.2, -0.3)
    name: ClassVar[str] = "fixed_quadratic"

    def sample(self, key):
        return {"c": jnp.asarray(self.c)}

    def init(self, spec, key):
        return {"x": jnp.asarray(self.x0)}

    def loss(self, spec, params, batch):
        return 0.5 * jnp.mean(jnp.asarray(self.h) * (params["x"] - spec["c"]) ** 2), {}

    def batch(self, spec, key, split):
        return {}

    def trajectory_gradient(self, theta: np.ndarray, length: int, trunc: int | None = None) -> np.ndarray:
        """d/dtheta of the meta-loss 1/T sum_{t=1..T} loss(x_t) (the loss AFTER each update,
        Metz et al. 2019) for the constant-step optimizer x_t = x0 + t theta, T = ``length``.

        With ``trunc`` K, the TBPTT gradient: within each truncation the state at its start is
        treated as a constant, so loss(x_t) contributes (t - K floor((t - 1) / K)) * dloss/dx:
        the number of this truncation's updates that x_t owes to theta."""
        h, c, x0 = map(np.asarray, (self.h, self.c, self.x0))
        g = np.zeros_like(theta, dtype=np.float64)
        for t in range(1, length + 1):
            x = x0 + t * theta
            lever = t if trunc is None else t - trunc * ((t - 1) // trunc)
            g += lever * h * (x - c) / h.size
        return g / length


@dataclasses.dataclass(frozen=True)
class Cosine:
    """loss(x) = mean_i (1 - cos x_i); with a large step the map x - a sin(x) is chaotic."""

    dim: int = 4
    name: ClassVar[str] = "cosine"

    def sample(self, key):
        return {"x0": jax.random.uniform(key, (self.dim,), minval=-2.0, maxval=2.0)}

    def init(self, spec, key):
        return {"x": spec["x0"]}

    def loss(self, spec, params, batch):
        return jnp.mean(1.0 - jnp.cos(params["x"])) * self.dim, {}

    def batch(self, spec, key, split):
        return {}


@dataclasses.dataclass(frozen=True)
class ConstantStep:
    """Ignores gradients: update = theta, so x_t = x0 + t theta (meta-loss quadratic in theta)."""

    dim: int = 3
    name: ClassVar[str] = "constant_step"

    def init(self, key):
        return {"step": jnp.asarray([0.1, -0.05, 0.02][: self.dim] + [0.0] * max(0, self.dim - 3))}

    def optimizer(self, meta_params):
        def update(updates, state, params=None, **extra):
            return jax.tree.map(lambda g: meta_params["step"] + 0.0 * g, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


@dataclasses.dataclass(frozen=True)
class LearnedLR:
    """SGD with per-coordinate learning rates exp(theta) (``dim`` > 1) or one shared rate."""

    dim: int = 1
    log_lr: float = -2.0
    name: ClassVar[str] = "learned_lr"

    def init(self, key):
        return {"log_lr": jnp.full((self.dim,), self.log_lr)}

    def optimizer(self, meta_params):
        def update(updates, state, params=None, **extra):
            lr = jnp.exp(meta_params["log_lr"])
            return jax.tree.map(lambda g: -lr * g, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


@dataclasses.dataclass(frozen=True)
class TeacherAsLearnedOptimizer:
    """A hand-designed optax optimizer dressed as a learned optimizer with no meta-params
    (a reference trajectory for behaviour cloning and imitation tests)."""

    teacher: str = "adam"
    learning_rate: float = 1e-3
    name: ClassVar[str] = "teacher_as_lo"

    def init(self, key):
        return {}

    def optimizer(self, meta_params):
        from lopt import teachers

        opt = teachers.get(self.teacher, learning_rate=self.learning_rate)
        return optax.GradientTransformationExtraArgs(
            opt.init, lambda g, s, p=None, **extra: opt.update(g, s, p)
        )
