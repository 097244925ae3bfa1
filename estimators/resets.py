"""Reset policies: what a particle starts each truncation ("segment") from.

The :class:`~estimators.unroll.Unroller` asks its reset policy at one point of every
truncation, before its first inner step, which state each particle starts from; a trajectory
that reaches its length inside the truncation continues with a fresh one (a new task instance
and initialisation, position 0). A policy:

* ``init(example)`` -> its state (``example``: one particle's state), held replicated on every
  device (``None`` for a stateless policy);
* ``draw(state, keys, outer_step)`` -> (restore [P] bool, restored particles [P, ...]): which
  particles start the truncation from a stored state, and those states;
* ``segment_reset``: True if a particle never continues its own state into the next truncation
  (every truncation starts restored or fresh), False if it continues until its trajectory ends;
* ``push_index(keys, n_steps)`` -> [P] int32 or None: after which inner step (0-based index
  within the truncation) each particle offers its state to the policy;
* ``observe(state, offered, valid, shard_axis)`` -> the new state: the offered states, with
  ``valid`` marking those the policy may keep.

Estimators never see buffer slots: the unroll reports a typed
:class:`~estimators.unroll.ResetInfo` (which particles continued, which were restored, from
which position).

Two policies: :class:`FreshReset` (the default: a particle continues its trajectory until it
ends, then starts fresh) and :class:`ELOReplay` (ELO's replay buffer). Both are in
:data:`REGISTRY` (``fresh``, ``elo_replay``), where a policy of one's own is registered with
:func:`register` and named in a config's ``unroll.reset`` (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from estimators import keys as keys_lib
from tasks.registry import Registry

REGISTRY: Registry[Any] = Registry("reset policy")
register = REGISTRY.register


@register("fresh")
@dataclasses.dataclass(frozen=True)
class FreshReset:
    """A particle continues its trajectory across truncations until it reaches its length, then
    starts a fresh task instance and initialisation (position 0)."""

    segment_reset = False

    def init(self, example: Any) -> None:
        del example
        return None

    def draw(self, state: None, keys: jax.Array, outer_step: jax.Array) -> tuple[jax.Array, None]:
        del state, outer_step
        return jnp.zeros(keys.shape[:1], bool), None

    def push_index(self, keys: jax.Array, n_steps: jax.Array) -> None:
        return None

    def observe(self, state: None, offered: Any, valid: Any, shard_axis: str | None,
                num_shards: int = 1) -> None:
        return state


class ReplayState(NamedTuple):
    """ELO's buffer B: ``capacity`` slots of particle states (a ParticleState whose leaves have a
    leading [capacity] axis), a FIFO ring."""

    entries: Any
    head: jax.Array  # int32: the slot the next push writes (the oldest entry once full)
    size: jax.Array  # int32: stored entries m <= M
    pushes: jax.Array  # int32: states enqueued so far


@register("elo_replay")
@dataclasses.dataclass(frozen=True)
class ELOReplay:
    """ELO's replay buffer of optimizee states (ELO, Algorithm 1, the green lines):

         1: Initialize replay buffer B = {s_1, ..., s_m}, m <= M
         3: Sample P_B ~ Uniform(0, 1)
         4: if P_B > P_th and t > 0 then
         5:   Initialize from buffer: s* ~ B (K != 0)
         6: else
         7:   Random initialization (K = 0)
         8: Sample N_push in (K, N + K) intersected with Z
         9: for inner step n = K, ..., K + N - 1 do
        15:   if n == N_push then
        16:     B <- enqueue(B, s_n) if m < M, else enqueue(dequeue(B), s_n)

    How this implementation reads it:

    * Every outer step t every particle starts its segment of N = ``trunc_length`` inner steps
      from a stored state drawn uniformly from B when u ~ U(0, 1) exceeds ``p_threshold``, t > 0
      and B is not empty, else from a fresh task instance and init (K = 0): a particle never
      continues its own state, it continues a chain through the buffer (``segment_reset``).
    * A restored state continues from ITS position K (inner steps K ... K + N - 1), with its
      task instance, optimizer state and trajectory length. Chaining segments through the
      buffer reaches positions far beyond N "without extra cost". The trajectory length (drawn
      from ``unroll.horizon`` when the chain started) caps a chain's position: a chain that
      reaches it continues fresh within the segment, and a state at its length is not enqueued.
    * N_push in (K, N + K), both ends excluded: the state after t = N_push - K updates of the
      segment, t uniform in {1, ..., N - 1} (t = 1 when N = 1, where the interval is empty).
    * B is ONE buffer of M = ``capacity`` states for the whole run, as in the paper: every
      particle draws from all of it and pushes into it. Each outer step the pushed states of
      all particles (across all devices: ``all_gather``) are enqueued in global particle order,
      so every device holds the same copy and a run gives the same draws on 1 or 8 devices.
      Antithetic partners (which restore the same slot) push once per pair: the positive
      member's state.
    * Estimators see only which particles were restored (``ResetInfo``). Every segment starts
      restored or fresh, so nothing persists from one truncation to the next: PES refuses this
      policy (it would compute truncated ES, ``estimators/pes.py``); use ``es``.
    """

    capacity: int = 256
    p_threshold: float = 0.5

    segment_reset = True

    def __post_init__(self):
        if isinstance(self.capacity, bool) or int(self.capacity) < 1:
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

    def draw(self, state: ReplayState, keys: jax.Array, outer_step: jax.Array) -> tuple[jax.Array, Any]:
        """Lines 3-7: per particle, restore (u > P_th, t > 0, B not empty) and the restored
        state, drawn uniformly from the m stored entries."""

        def one(key):
            k_u, k_slot = jax.random.split(keys_lib.salted(key, keys_lib.RESTORE))
            restore = (jax.random.uniform(k_u) > self.p_threshold) & (outer_step > 0) & (state.size > 0)
            slot = jax.random.randint(k_slot, (), 0, jnp.maximum(state.size, 1))
            return restore, slot

        restore, slots = jax.vmap(one)(keys)
        return restore, jax.tree.map(lambda buf: buf[slots], state.entries)

    def push_index(self, keys: jax.Array, n_steps: jax.Array) -> jax.Array:
        """Line 8: the index j of the inner step after which the state is pushed (it has then
        had t = j + 1 updates of the segment), t uniform in {1, ..., N - 1}."""
        hi = jnp.maximum(n_steps - 1, 1)
        return jax.vmap(
            lambda k: jax.random.randint(keys_lib.salted(k, keys_lib.PUSH), (), 1, hi + 1) - 1
        )(keys).astype(jnp.int32)

    def observe(self, state: ReplayState, offered: Any, valid: jax.Array,
                shard_axis: str | None, num_shards: int = 1) -> ReplayState:
        """Line 16 for every particle's offered state, in global particle order (the last M
        valid ones survive when more than M are offered)."""
        if shard_axis is not None:
            offered, valid = gather_replicated((offered, valid), shard_axis, num_shards)
        m = self.capacity
        n = jnp.sum(valid.astype(jnp.int32))
        rank = jnp.cumsum(valid.astype(jnp.int32)) - 1  # position among this step's pushes
        keep = valid & (rank >= n - m)
        slot = jnp.where(keep, (state.head + rank) % m, m)  # m: dropped (out of bounds)
        entries = jax.tree.map(
            lambda buf, x: buf.at[slot].set(jnp.asarray(x, buf.dtype), mode="drop"),
            state.entries,
            offered,
        )
        return ReplayState(
            entries=entries,
            head=(state.head + n) % m,
            size=jnp.minimum(state.size + n, m),
            pushes=state.pushes + n,
        )

    @staticmethod
    def fifo_slots(state: ReplayState) -> jax.Array:
        """Slots of the stored entries from oldest to newest (the first ``size`` are meaningful)."""
        capacity = jax.tree.leaves(state.entries)[0].shape[0]
        return (state.head - state.size + jnp.arange(capacity)) % capacity


def gather_replicated(tree: Any, axis: str, num_shards: int) -> Any:
    """Every device's leading-axis block of ``tree``, concatenated in device order, as a value
    replicated on all devices: each device writes its block into zeros of the global size and
    a ``psum`` adds them (exact: every element has exactly one non-zero term), which types the
    result as the same on every device, as the buffer must be."""
    index = jax.lax.axis_index(axis)

    def one(x):
        n = x.shape[0]
        wide = jnp.zeros((n * num_shards,) + x.shape[1:], jnp.int32 if x.dtype == bool else x.dtype)
        wide = jax.lax.dynamic_update_slice_in_dim(wide, x.astype(wide.dtype), index * n, 0)
        out = jax.lax.psum(wide, axis)
        return out.astype(bool) if x.dtype == bool else out

    return jax.tree.map(one, tree)


def get(name: str, **overrides: Any) -> Any:
    """Build the reset policy registered as ``name`` with ``overrides`` of its options."""
    return REGISTRY.get(name, **overrides)


__all__ = ["ELOReplay", "FreshReset", "REGISTRY", "ReplayState", "get", "register"]
