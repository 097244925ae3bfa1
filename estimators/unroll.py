"""The inner-unroll engine shared by every gradient estimator (DESIGN.md, "estimators/").

An :class:`Unroller` advances a batch of *particles* (one task instance, one inner trajectory
each) by ``trunc_length`` inner steps with ``lax.scan`` under ``vmap``. A particle whose
trajectory reaches its length is reset inside the scan: a fresh task sample, fresh params and
optimizer state, and a new length from the horizon schedule. It returns the per-step meta-loss
terms and a done-mask, so each estimator can attribute every step's loss to the trajectory it
belongs to.

Meta-loss (one choice for every estimator, :class:`MetaLoss`): per step either the training
loss of the batch used for that step's gradient (``split="train"``) or the loss of a fresh
validation batch after the update (``split="valid"``, the Metz et al. 2019 option). Each term
is divided by the trajectory's first term (``normalize="initial"``) so tasks of different loss
scales weigh alike, and clipped at ``clip`` so a diverging inner run cannot dominate the
meta-gradient (Metz et al. 2019 Sec. 4 use a similar clip; non-finite terms become ``clip``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from estimators.schedules import Schedule
from lopt.base import LearnedOptimizer, MetaParams
from tasks.base import TaskFamily


class ParticleState(NamedTuple):
    """One inner trajectory (batched over particles by a leading axis)."""

    spec: Any
    params: Any
    opt_state: Any
    step: jax.Array  # int32: inner steps taken in this trajectory
    length: jax.Array  # int32: this trajectory's horizon
    init_loss: jax.Array  # float32: first meta-loss term, the normaliser


class UnrollState(NamedTuple):
    particles: ParticleState
    outer_step: jax.Array  # int32: truncations unrolled so far (drives the horizon schedule)


class UnrollOutput(NamedTuple):
    losses: jax.Array  # [P, T] normalised, clipped meta-loss terms
    raw_losses: jax.Array  # [P, T] training-batch losses before normalisation
    done: jax.Array  # [P, T] bool: the trajectory ended at this step (state after it is fresh)


@dataclasses.dataclass(frozen=True)
class MetaLoss:
    """How per-step losses become the meta-objective (see module docstring)."""

    split: str = "train"
    normalize: str = "initial"
    clip: float = 2.0

    def __post_init__(self):
        if self.split not in ("train", "valid"):
            raise ValueError(f"meta_loss.split must be 'train' or 'valid', got {self.split!r}")
        if self.normalize not in ("initial", "none"):
            raise ValueError(f"meta_loss.normalize must be 'initial' or 'none', got {self.normalize!r}")
        if not self.clip > 0:
            raise ValueError(f"meta_loss.clip must be positive, got {self.clip}")

    def term(self, loss: jax.Array, init_loss: jax.Array) -> jax.Array:
        if self.normalize == "initial":
            loss = loss / jnp.maximum(init_loss, 1e-8)
        return jnp.where(jnp.isfinite(loss), jnp.minimum(loss, self.clip), self.clip)


def _tree_where(cond: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def checkpointed_scan(body: Callable, carry: Any, xs: Any, length: int) -> tuple[Any, Any]:
    """``lax.scan`` whose backward pass stores O(sqrt(T)) carries instead of O(T).

    The T steps run as an outer scan over chunks of ~sqrt(T) steps; each chunk is wrapped in
    ``jax.checkpoint``, so only chunk-boundary carries are saved and a chunk's internals are
    recomputed during backprop (Griewank-style two-level checkpointing).
    """
    chunk = max(d for d in range(1, math.isqrt(length) + 1) if length % d == 0)
    if chunk == 1:
        return jax.lax.scan(jax.checkpoint(body), carry, xs)

    def run_chunk(c, xs_chunk):
        return jax.lax.scan(body, c, xs_chunk)

    xs = jax.tree.map(lambda x: x.reshape((length // chunk, chunk) + x.shape[1:]), xs)
    carry, ys = jax.lax.scan(jax.checkpoint(run_chunk), carry, xs)
    ys = jax.tree.map(lambda y: y.reshape((length,) + y.shape[2:]), ys)
    return carry, ys


@dataclasses.dataclass(frozen=True)
class Unroller:
    """Runs truncations of inner training for a batch of particles (see module docstring)."""

    task_family: TaskFamily
    learned_opt: LearnedOptimizer
    num_particles: int
    trunc_length: int
    horizon: Schedule
    meta_loss: MetaLoss = MetaLoss()
    stagger: bool = True  # first trajectories get lengths uniform in [1, L] to desynchronise resets

    def __post_init__(self):
        if self.num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {self.num_particles}")
        if self.trunc_length < 1:
            raise ValueError(f"trunc_length must be >= 1, got {self.trunc_length}")

    # -- one particle -------------------------------------------------------------------------

    def fresh_particle(
        self, meta_params: MetaParams, key: jax.Array, outer_step: jax.Array
    ) -> ParticleState:
        """A new trajectory: sample a task instance, initialise it, draw its length."""
        k_spec, k_init, k_len = jax.random.split(key, 3)
        spec = self.task_family.sample(k_spec)
        params = self.task_family.init(spec, k_init)
        opt_state = self.learned_opt.optimizer(meta_params).init(params)
        return ParticleState(
            spec=spec,
            params=params,
            opt_state=opt_state,
            step=jnp.zeros([], jnp.int32),
            length=jnp.maximum(self.horizon(k_len, outer_step), 1),
            init_loss=jnp.ones([], jnp.float32),
        )

    def inner_step(
        self, meta_params: MetaParams, ps: ParticleState, key: jax.Array, outer_step: jax.Array
    ) -> tuple[ParticleState, tuple[jax.Array, jax.Array, jax.Array]]:
        """One inner training step of one particle, resetting it if its trajectory ends."""
        task = self.task_family
        k_batch, k_valid, k_reset = jax.random.split(key, 3)
        batch = task.batch(ps.spec, k_batch, "train")
        (loss, _), grads = jax.value_and_grad(task.loss, argnums=1, has_aux=True)(
            ps.spec, ps.params, batch
        )
        opt = self.learned_opt.optimizer(meta_params)
        updates, opt_state = opt.update(grads, ps.opt_state, ps.params, loss=loss)
        params = optax.apply_updates(ps.params, updates)
        if self.meta_loss.split == "valid":
            valid_batch = task.batch(ps.spec, k_valid, "valid")
            term_loss = task.loss(ps.spec, params, valid_batch)[0]
        else:
            term_loss = loss
        init_loss = jnp.where(ps.step == 0, term_loss, ps.init_loss).astype(ps.init_loss.dtype)
        term = self.meta_loss.term(term_loss, init_loss)
        step = ps.step + 1
        done = step >= ps.length
        advanced = ParticleState(ps.spec, params, opt_state, step, ps.length, init_loss)
        fresh = self.fresh_particle(meta_params, k_reset, outer_step)
        return _tree_where(done, fresh, advanced), (term, loss, done)

    # -- batches of particles -----------------------------------------------------------------

    def init(self, meta_params: MetaParams, keys: jax.Array) -> UnrollState:
        """Fresh particles, one per key (``keys``: [P, 2]); pass equal keys for antithetic pairs."""
        outer_step = jnp.zeros([], jnp.int32)

        def one(key):
            k_fresh, k_stagger = jax.random.split(key)
            ps = self.fresh_particle(meta_params, k_fresh, outer_step)
            if self.stagger:
                u = jax.random.uniform(k_stagger)
                length = jnp.ceil(u * ps.length).astype(jnp.int32)
                ps = ps._replace(length=jnp.clip(length, 1, ps.length))
            return ps

        return UnrollState(jax.vmap(one)(keys), outer_step)

    def unroll(
        self,
        meta_params: MetaParams,
        state: UnrollState,
        keys: jax.Array,
        *,
        per_particle_meta_params: bool = False,
        checkpoint: bool = False,
    ) -> tuple[UnrollState, UnrollOutput]:
        """Advance every particle ``trunc_length`` steps.

        Args:
          meta_params: shared meta-params, or with a leading particle axis when
            ``per_particle_meta_params`` (ES-type estimators' perturbed copies).
          state: the particles, leading axis P.
          keys: [P, 2] one key per particle; particles with equal keys see the same batches,
            resets and new tasks (antithetic pairs).
          checkpoint: recompute inner steps in the backward pass (``checkpointed_scan``) for
            gradient-based estimators.
        """
        outer_step = state.outer_step
        step_keys = jax.vmap(lambda k: jax.random.split(k, self.trunc_length))(keys)  # [P,T,2]

        def one_particle(theta, ps, ks):
            def body(carry, k):
                return self.inner_step(theta, carry, k, outer_step)

            scan = checkpointed_scan if checkpoint else _plain_scan
            return scan(body, ps, ks, self.trunc_length)

        in_axes = (0 if per_particle_meta_params else None, 0, 0)
        particles, (terms, losses, done) = jax.vmap(one_particle, in_axes=in_axes)(
            meta_params, state.particles, step_keys
        )
        return UnrollState(particles, outer_step + 1), UnrollOutput(terms, losses, done)


def _plain_scan(body, carry, xs, length):
    del length
    return jax.lax.scan(body, carry, xs)
