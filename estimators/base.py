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
    """Antithetic estimators run particles as (+eps, -eps) pairs sharing one task and data stream.

    Particles are interleaved: particle 2i is pair i's positive member, 2i + 1 its negative, so
    a contiguous block of particles (one device's shard) always holds whole pairs."""
    if unroller.num_particles % 2:
        where = "per device" if unroller.shard_axis else "in total"
        raise ValueError(
            f"estimator '{estimator_name}' uses antithetic pairs, so num_particles must be even "
            f"{where}; got {unroller.num_particles} (set num_particles={unroller.num_particles + 1})"
        )
    return unroller.num_particles // 2


def global_indices(unroller: Unroller, n_local: int) -> jax.Array:
    """Global indices of this shard's ``n_local`` particles (or pairs).

    Randomness is keyed by global index, never by position in a shard, so a run gives the same
    particles on 1 or 8 devices (DESIGN.md principle 6)."""
    offset = 0
    if unroller.shard_axis is not None:
        offset = jax.lax.axis_index(unroller.shard_axis) * n_local
    return jnp.arange(n_local) + offset


def index_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def particle_keys(unroller: Unroller, key: jax.Array) -> jax.Array:
    """[P, 2] independent keys, one per (global) particle."""
    return index_keys(key, global_indices(unroller, unroller.num_particles))


def pair_keys(unroller: Unroller, key: jax.Array) -> jax.Array:
    """[2N, 2] keys; both members of a pair share theirs (same task, batches and resets)."""
    n = unroller.num_particles // 2
    return jnp.repeat(index_keys(key, global_indices(unroller, n)), 2, axis=0)


def sample_perturbation(
    unroller: Unroller, key: jax.Array, meta_params: MetaParams, std: float
) -> MetaParams:
    """One Gaussian perturbation eps_i ~ N(0, std^2 I) per (global) pair, leading axis N."""
    leaves, treedef = jax.tree.flatten(meta_params)

    def one(k):
        ks = jax.random.split(k, len(leaves))
        return [std * jax.random.normal(kk, jnp.shape(x), jnp.float32) for kk, x in zip(ks, leaves)]

    keys = index_keys(key, global_indices(unroller, unroller.num_particles // 2))
    return jax.tree.unflatten(treedef, jax.vmap(one)(keys))


def antithetic_params(meta_params: MetaParams, eps: MetaParams) -> MetaParams:
    """[2N, ...] meta-params, theta + eps_i at particle 2i and theta - eps_i at 2i + 1."""
    return from_pairs(
        jax.tree.map(lambda t, e: jnp.stack([t + e, t - e], axis=1), meta_params, eps)
    )


def antithetic_unroll(
    unroller: Unroller, meta_params: MetaParams, unroll_state: Any, key: jax.Array, std: float
) -> tuple[MetaParams, Any, Any]:
    """One truncation of the antithetic particles (truncated ES / PES, Vicol et al. 2021):
    draws eps_i per pair, unrolls theta + eps_i and theta - eps_i with shared task keys, and
    returns ``(eps, new unroll state, UnrollOutput)``."""
    k_eps, k_unroll = jax.random.split(key)
    eps = sample_perturbation(unroller, k_eps, meta_params, std)
    unroll, out = unroller.unroll(
        antithetic_params(meta_params, eps),
        unroll_state,
        pair_keys(unroller, k_unroll),
        per_particle_meta_params=True,
    )
    return eps, unroll, out


def split_signs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The positive and negative members' values of an interleaved [2N, ...] array."""
    return x[0::2], x[1::2]


def weighted_sum(coef: jax.Array, tree: MetaParams) -> MetaParams:
    """sum_i coef_i * tree_i over the leading axis."""
    return jax.tree.map(lambda x: jnp.tensordot(coef, x, axes=1), tree)


def to_pairs(tree: Any) -> Any:
    """[2N, ...] interleaved particles -> [N, 2, ...] (row i: pair i's +, - members)."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] // 2, 2) + x.shape[1:]), tree)


def from_pairs(tree: Any) -> Any:
    """Inverse of :func:`to_pairs`."""
    return jax.tree.map(lambda x: x.reshape((x.shape[0] * 2,) + x.shape[2:]), tree)


def keep_positive(tree: Any) -> Any:
    """Both members of every pair continue from the positive trajectory's state."""
    return jax.tree.map(lambda x: jnp.repeat(x[0::2], 2, axis=0), tree)


def keep_positive_unroll(unroll: Any) -> Any:
    """:func:`keep_positive` for an ``UnrollState``: the particles and, with the replay
    buffer, the buffers (so partners restore the same entry)."""
    return unroll._replace(
        particles=keep_positive(unroll.particles), replay=keep_positive(unroll.replay)
    )


def per_device(unroller: Unroller, tree: Any) -> Any:
    """Mark replicated meta-params as varying across devices before differentiating.

    Inside ``shard_map``, ``jax.grad`` with respect to a replicated value returns the *sum* of
    every device's gradient (the transpose of the implicit replicated-to-varying cast is a
    psum). Estimators want this device's own gradient, averaged explicitly by the trainer."""
    if unroller.shard_axis is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, unroller.shard_axis, to="varying"), tree)


def pair_mean(unroller: Unroller, x: jax.Array) -> jax.Array:
    """Mean over the leading (pair) axis across every shard."""
    m = x.mean(0)
    return m if unroller.shard_axis is None else jax.lax.pmean(m, unroller.shard_axis)


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
