"""The ELO replay buffer: a fixed-size ring buffer of optimizee states on device.

Restarting every inner trajectory from scratch spends most meta-training on the first steps
of inner training. The ELO recipe keeps a first-in-first-out buffer of M optimizee states
visited during meta-training and restarts trajectories from it:

* **reset.** When a particle's trajectory ends, draw u ~ U(0, 1). If u > P_th, the outer
  step is past 0 and the buffer is non-empty, the particle restarts from a stored entry drawn
  uniformly; otherwise it starts fresh (new task instance, K = 0).
* **push.** During each truncation of N steps starting at inner step K, the state at step
  N_push ~ U(K, N + K) (the state after a uniformly drawn number 1..N of the truncation's
  steps) is enqueued; when the buffer is full the oldest entry is dequeued (overwritten).

An entry is a whole :class:`~estimators.unroll.ParticleState`: the task spec, the optimizee
params, the optimizer state (the learned optimizer's accumulators, and the teacher state of
behaviour cloning or self-improving mixing), the inner step K, the trajectory length and the
meta-loss normaliser. A restored particle therefore continues exactly where the stored one
was. What an *estimator* needs to stay consistent is kept by the estimator in an array
aligned with the buffer's slots (PES keeps each entry's perturbation sum, see
``estimators/pes.py``); :class:`ReplayState` reports which slot each push wrote.

Layout and sharding. Every particle owns one buffer of ``capacity`` entries (leading axis of
every leaf: particles, then slots), so the buffer is sharded over devices with its particles
and a run gives the same draws on 1 or 8 devices. Antithetic partners share their keys, so
they push at the same step and restore the same slot: each restores its *own* copy of that
entry (PES: the +/- members of the pair's trajectory at the push, consistent with the pair's
stored perturbation sum); ES and ``merged``, whose partners continue from the positive
member's state, also copy the positive member's buffer to its partner after each truncation.
Pushes become visible at the end of the truncation, so restores during a truncation draw
from the buffer as it was when the truncation began.

The buffer is **per particle**: ``capacity`` M is the number of entries each particle keeps
(total states stored: M x num_particles, of which M x num_pairs distinct trajectories for
antithetic estimators).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Salts for the replay buffer's random draws, folded into the keys the Unroller already uses,
# so switching the buffer on never changes the batches, tasks or lengths a particle draws.
RESTORE_SALT = 0x5E57
PUSH_SALT = 0x9054


class ReplayState(NamedTuple):
    """One particle's ring buffer (the Unroller batches it over particles)."""

    entries: Any  # a ParticleState whose leaves have a leading [capacity] axis
    head: jax.Array  # int32: the slot the next push writes (the oldest entry once full)
    size: jax.Array  # int32: number of stored entries, <= capacity
    pushes: jax.Array  # int32: pushes so far (for diagnostics: entry ages)


@dataclasses.dataclass(frozen=True)
class ReplayBuffer:
    """ELO replay buffer options (see module docstring).

    capacity: M, entries kept per particle.
    p_threshold: P_th; a reset restores a stored entry when u ~ U(0, 1) exceeds it, so a
      reset restores with probability 1 - P_th once the buffer holds something.
    """

    capacity: int = 32
    p_threshold: float = 0.5

    def __post_init__(self):
        if int(self.capacity) < 1:
            raise ValueError(f"replay: capacity must be >= 1, got {self.capacity}")
        if not 0.0 <= float(self.p_threshold) <= 1.0:
            raise ValueError(f"replay: p_threshold must lie in [0, 1], got {self.p_threshold}")
        object.__setattr__(self, "capacity", int(self.capacity))
        object.__setattr__(self, "p_threshold", float(self.p_threshold))

    def init(self, example: Any) -> ReplayState:
        """An empty buffer for entries shaped like ``example`` (one particle's state)."""
        entries = jax.tree.map(
            lambda x: jnp.zeros((self.capacity,) + jnp.shape(x), jnp.result_type(x)), example
        )
        zero = jnp.zeros([], jnp.int32)
        return ReplayState(entries, zero, zero, zero)

    def push(self, state: ReplayState, entry: Any) -> ReplayState:
        """Enqueue ``entry`` at the head, overwriting (dequeuing) the oldest entry when full."""
        entries = jax.tree.map(
            lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, jnp.asarray(x, buf.dtype), state.head, 0),
            state.entries,
            entry,
        )
        return ReplayState(
            entries=entries,
            head=(state.head + 1) % self.capacity,
            size=jnp.minimum(state.size + 1, self.capacity),
            pushes=state.pushes + 1,
        )

    def lookup(self, state: ReplayState, slot: jax.Array) -> Any:
        """The entry stored in ``slot``."""
        return jax.tree.map(
            lambda buf: jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False), state.entries
        )

    def draw(
        self, state: ReplayState, key: jax.Array, outer_step: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """At a reset: (restore?, slot). Restore iff u > P_th, outer_step > 0 and the buffer is
        non-empty; the slot is uniform over the stored entries (slots 0..size-1 are filled
        until the buffer is full, all of them afterwards)."""
        k_u, k_slot = jax.random.split(key)
        u = jax.random.uniform(k_u)
        slot = jax.random.randint(k_slot, (), 0, jnp.maximum(state.size, 1))
        restore = (u > self.p_threshold) & (outer_step > 0) & (state.size > 0)
        return restore, slot.astype(jnp.int32)

    @staticmethod
    def push_index(key: jax.Array, n_steps: jax.Array) -> jax.Array:
        """Index t in [0, n_steps) of the truncation step after which the state is pushed:
        N_push = K + t + 1 is uniform in (K, K + N]."""
        return jax.random.randint(key, (), 0, jnp.maximum(n_steps, 1)).astype(jnp.int32)

    @staticmethod
    def fifo_slots(state: ReplayState) -> jax.Array:
        """Slots of one particle's stored entries from oldest to newest (``size`` of them are
        meaningful; the rest of the ``capacity``-long result repeats slots)."""
        capacity = jax.tree.leaves(state.entries)[0].shape[0]
        return (state.head - state.size + jnp.arange(capacity)) % capacity


def from_config(section: Any) -> ReplayBuffer | None:
    """``config.unroll.replay`` -> a :class:`ReplayBuffer`, or None when the section is absent,
    empty or has ``enabled: False`` (so one config line switches the buffer off)."""
    from estimators.imitation import section_options  # shared config helper

    options = section_options(section, "unroll.replay", ReplayBuffer)
    return None if options is None else ReplayBuffer(**options)
