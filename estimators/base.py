"""The gradient-estimator contract and helpers shared by the ES family."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from estimators.unroll import Unroller
from lopt.base import MetaParams

EstimatorState = Any


class Estimator(Protocol):
    """Static, hashable; knows only its own hyperparameters (DESIGN.md, "estimators/")."""

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> EstimatorState:
        """Particles' states and whatever the estimator carries between truncations."""

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: EstimatorState, key: jax.Array
    ) -> tuple[MetaParams, EstimatorState, dict]:
        """Meta-gradient estimate, new state, and scalar metrics."""


def num_pairs(unroller: Unroller, estimator_name: str) -> int:
    """Antithetic estimators run particles as (+eps, -eps) pairs sharing one task and data stream."""
    if unroller.num_particles % 2:
        raise ValueError(
            f"estimator '{estimator_name}' uses antithetic pairs, so num_particles must be even; "
            f"got {unroller.num_particles} (set num_particles={unroller.num_particles + 1})"
        )
    return unroller.num_particles // 2


def pair_keys(key: jax.Array, n_pairs: int) -> jax.Array:
    """[2N, 2] keys where particle i and i + N (the antithetic partner) share a key."""
    keys = jax.random.split(key, n_pairs)
    return jnp.concatenate([keys, keys], axis=0)


def sample_perturbation(key: jax.Array, meta_params: MetaParams, n: int, std: float) -> MetaParams:
    """n Gaussian perturbations eps ~ N(0, std^2 I) shaped like ``meta_params`` (leading axis n)."""
    leaves, treedef = jax.tree.flatten(meta_params)
    keys = jax.random.split(key, len(leaves))
    eps = [std * jax.random.normal(k, (n,) + jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, eps)


def antithetic_params(meta_params: MetaParams, eps: MetaParams) -> MetaParams:
    """Stack theta + eps (first N particles) and theta - eps (last N)."""
    return jax.tree.map(lambda t, e: jnp.concatenate([t + e, t - e], axis=0), meta_params, eps)


def weighted_sum(coef: jax.Array, tree: MetaParams) -> MetaParams:
    """sum_i coef_i * tree_i over the leading axis."""
    return jax.tree.map(lambda x: jnp.tensordot(coef, x, axes=1), tree)


def to_pairs(tree: Any, n_pairs: int) -> Any:
    """[2N, ...] (positives then negatives) -> [N, 2, ...] (one row per antithetic pair)."""
    return jax.tree.map(lambda x: jnp.stack([x[:n_pairs], x[n_pairs:]], axis=1), tree)


def from_pairs(tree: Any) -> Any:
    """Inverse of :func:`to_pairs`."""
    return jax.tree.map(lambda x: jnp.concatenate([x[:, 0], x[:, 1]], axis=0), tree)


def keep_positive(tree: Any, n_pairs: int) -> Any:
    """Both members of every pair continue from the positive trajectory's state."""
    return jax.tree.map(lambda x: jnp.concatenate([x[:n_pairs], x[:n_pairs]], axis=0), tree)


@dataclasses.dataclass(frozen=True)
class ESOptions:
    """Options shared by every ES-type estimator.

    std: perturbation standard deviation sigma.
    loss_diff_clip: if set, L+ - L- is clipped to [-c, c] (robustness to exploding unrolls).
    sign: use sign(L+ - L-) * sigma in place of the difference, a scale-free variant whose
      expectation is proportional to the smoothed gradient's direction, not its size.
    """

    std: float = 0.01
    loss_diff_clip: float | None = None
    sign: bool = False

    def __post_init__(self):
        if not self.std > 0:
            raise ValueError(f"{type(self).__name__}: std must be positive, got {self.std}")
        if self.loss_diff_clip is not None and not self.loss_diff_clip > 0:
            raise ValueError(f"loss_diff_clip must be positive or None, got {self.loss_diff_clip}")

    def shape_diff(self, diff: jax.Array) -> jax.Array:
        """Apply the sign / clip options to loss differences L+ - L-."""
        if self.sign:
            return jnp.sign(diff) * self.std
        if self.loss_diff_clip is not None:
            return jnp.clip(diff, -self.loss_diff_clip, self.loss_diff_clip)
        return diff

    def es_coefficients(self, diff: jax.Array) -> jax.Array:
        """Per-pair weights c_i with  g = sum_i c_i eps_i = 1/(2 sigma^2 N) sum_i dL_i eps_i
        (the antithetic ES estimator, Salimans et al. 2017 / Vicol et al. 2021 eq. 3)."""
        return self.shape_diff(diff) / (2.0 * self.std**2 * diff.shape[0])
