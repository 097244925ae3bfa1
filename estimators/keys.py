"""Random keys of the unroll, in one place: how a particle's, a pair's and a step's keys are
derived, and the salts that separate independent draws.

Every random number of meta-training is a pure function of the run's key and indices
(DESIGN.md principle 6). Randomness is keyed by a particle's *global* index, never by its
position in a device's shard, so a run draws the same tasks, batches, perturbations and
resets on 1 or 8 devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Salts folded into a key to derive an independent stream. Each names one kind of draw; adding
# a component that draws with its own salt never changes the draws of the others.
TRUNCATION_LENGTH = 0x7A11  # this outer step's truncation length (shared by all particles)
PARTICLES = 0x0A17  # per-particle (or per-pair) keys of a truncation
RESTORE = 0x5E57  # reset policy: restore from the buffer or not, and which slot
PUSH = 0x9054  # reset policy: which step of the segment is pushed
FRESH = 0xF2E5  # fresh trajectories prepared for a truncation
INNER_UPDATE = 0x313C  # the inner-update transformation's own draws (self-improving mixing)


def is_typed(key: jax.Array) -> bool:
    """Whether ``key`` is a typed key array (``jax.random.key``) rather than raw uint32 data
    (``jax.random.PRNGKey``)."""
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def raw(key: jax.Array) -> jax.Array:
    """``key`` as raw uint32 key data (``jax.random.PRNGKey``'s form): a typed key of the
    default Threefry implementation gives the same bits (``jax.random.key_data``), a raw key is
    returned as it is. Public entry points that store a key in a train state call this, so
    checkpoints hold one form whichever the caller passed."""
    if not is_typed(key):
        return key
    impl = str(jax.random.key_impl(key))
    if "threefry" not in impl:
        raise ValueError(f"keys of the {impl} implementation are not supported; use "
                         "jax.random.key(seed) or jax.random.PRNGKey(seed) (threefry2x32)")
    return jax.random.key_data(key)


def is_single(key: jax.Array) -> bool:
    """Whether ``key`` is one key (a typed scalar or raw uint32[2]) rather than an array of keys."""
    return key.ndim == (0 if is_typed(key) else 1)


def global_indices(n_local: int, shard_axis: str | None) -> jax.Array:
    """Global indices of this shard's ``n_local`` particles (or pairs); call inside
    ``shard_map`` when ``shard_axis`` is set."""
    offset = 0
    if shard_axis is not None:
        offset = jax.lax.axis_index(shard_axis) * n_local
    return jnp.arange(n_local) + offset


def index_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per index: ``fold_in(key, i)``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def particle_keys(key: jax.Array, num_particles: int, shard_axis: str | None) -> jax.Array:
    """[P, 2] independent keys, one per (global) particle."""
    return index_keys(key, global_indices(num_particles, shard_axis))


def pair_keys(key: jax.Array, num_particles: int, shard_axis: str | None) -> jax.Array:
    """[P, 2] keys where the antithetic partners 2i and 2i + 1 share pair i's key: the same
    task, batches and resets, so their loss difference measures the perturbation alone."""
    pairs = index_keys(key, global_indices(num_particles // 2, shard_axis))
    return jnp.repeat(pairs, 2, axis=0)


def salted(key: jax.Array, salt: int) -> jax.Array:
    """An independent stream of ``key`` for the draw named by ``salt``."""
    return jax.random.fold_in(key, salt)
