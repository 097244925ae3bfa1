"""The gradient-estimator contract and helpers shared by the ES family."""

from __future__ import annotations

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
