"""The inner-unroll engine shared by every gradient estimator (DESIGN.md, "estimators/").

An :class:`Unroller` advances a batch of *particles* (one task instance, one inner trajectory
each) by ``trunc_length`` inner steps with ``lax.scan`` under ``vmap``. A particle whose
trajectory reaches its length is reset inside the scan: a fresh task sample, fresh params and
optimizer state, and a new length from the horizon schedule. It returns the per-step meta-loss
terms and a done-mask, so each estimator can attribute every step's loss to the trajectory it
belongs to.

Meta-loss (one definition for every estimator, :class:`MetaLoss`): per inner step, the loss of
the parameters AFTER that step's update, on a fresh batch of the ``split`` ("train" or
"valid") drawn independently of the batch the update's gradient used. A truncation of T
steps from position K therefore scores the T updates it made, f(theta_{K+1}) ... f(theta_{K+T}):
Metz et al. 2019, Figure 1, L_train(theta) = E_{x ~ D_train}[1/T sum_{t=1..T} l(x; w(t))] and
L_valid likewise with D_valid. Two options, both off by default (the papers' objective is the
plain mean): ``normalize="initial"`` divides each term by the loss of the trajectory's initial
parameters (on a batch of the same split, under ``stop_gradient``: it does not depend on the
meta-params), so task instances of different loss scales weigh alike; ``clip`` bounds each term
(and turns a non-finite one into ``clip``) so a diverging inner run cannot dominate.

Optional components, each off unless given (see their modules):
  * ``replay`` (:class:`estimators.replay.ReplayBuffer`): the ELO replay buffer; a reset may
    restore a stored optimizee state instead of starting fresh, and each truncation enqueues
    one state. The buffer rides in ``UnrollState.replay`` (one ring buffer per particle).
  * ``behaviour_cloning`` (:class:`estimators.imitation.BehaviourCloning`): the ELO fused
    Adam/LO trajectory and fused meta-loss term.
  * ``self_improving`` (:class:`estimators.imitation.SelfImproving`): each inner step takes the
    update of an optimizer drawn from {learned, teachers}.
The teachers' optimizer states of the last two ride in ``ParticleState.aux``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from estimators.replay import PUSH_SALT, RESTORE_SALT
from estimators.schedules import Schedule, power_of_two_buckets
from lopt.base import LearnedOptimizer, MetaParams
from tasks.base import TaskFamily


class ParticleState(NamedTuple):
    """One inner trajectory (batched over particles by a leading axis)."""

    spec: Any
    params: Any
    opt_state: Any
    step: jax.Array  # int32: inner steps taken in this trajectory
    length: jax.Array  # int32: this trajectory's horizon
    init_loss: jax.Array  # float32: loss of the initial params on the meta-loss split (normaliser)
    aux: Any = None  # teacher optimizer state(s): behaviour cloning / self-improving mixing


class UnrollState(NamedTuple):
    particles: ParticleState
    outer_step: jax.Array  # int32: truncations unrolled so far (drives the horizon schedule)
    replay: Any = None  # ReplayState batched over particles (leading axis P), or None


class UnrollOutput(NamedTuple):
    losses: jax.Array  # [P, T] normalised, clipped meta-loss terms
    raw_losses: jax.Array  # [P, T] training-batch losses before normalisation
    done: jax.Array  # [P, T] bool: the trajectory ended at this step (state after it is fresh)
    mask: jax.Array  # [P, T] bool: the step ran (False only past a scheduled truncation length)
    # With a replay buffer (else None):
    restored: jax.Array | None = None  # [P, T] int32: slot restored by this step's reset, or -1
    push_index: jax.Array | None = None  # [P] int32: the state after this step was enqueued
    push_slot: jax.Array | None = None  # [P] int32: the buffer slot that push wrote

    def step_mean(self, x: jax.Array | None = None) -> jax.Array:
        """Mean of ``x`` (default: the meta-loss terms) over the steps that ran, per particle."""
        x = self.losses if x is None else x
        m = self.mask.astype(x.dtype)
        return (x * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)

    def step_weights(self) -> jax.Array:
        """[P, T] weights w_t with sum_t w_t x_t = step_mean(x): 1/T_run on steps that ran."""
        m = self.mask.astype(jnp.float32)
        return m / jnp.maximum(m.sum(-1, keepdims=True), 1.0)


#: An initial loss at or below this is "zero": normalising by it would blow every term up to
#: the clip (and zero the meta-gradient), so such a trajectory's terms are left unnormalised.
NORMALIZER_FLOOR = 1e-8


@dataclasses.dataclass(frozen=True)
class MetaLoss:
    """How per-step losses become the meta-objective (module docstring).

    split: ``"train"`` or ``"valid"``: the data the loss after each update is measured on
      (Metz et al. 2019's L_train and L_valid, Figure 1).
    normalize: ``"none"`` (default) or ``"initial"``: divide by the loss of the trajectory's
      initial parameters (theta-independent, under ``stop_gradient``). A trajectory whose initial
      loss is <= ``NORMALIZER_FLOOR`` is left unnormalised and counted (``unnormalized_share``).
    clip: None (default) or a bound c > 0: each term becomes min(term, c), non-finite -> c.

    What the papers used: Metz et al. 2019 (Figure 1, Sec. 2.1): the plain mean of the per-step
    loss over the truncation, no normalisation, no clip (``normalize="none", clip=None``). L2O-DM
    (Andrychowicz et al. 2016, eq. 2) and Chen et al. 2020 (Sec. 3, L_f = sum_t w_t f(theta_t)):
    a weighted sum of raw losses, here with w_t = 1/T. Neither paper normalises or clips; both are
    this framework's options for mixing task instances of different loss scales (e.g.
    ``normalize="initial", clip=2.0`` in the quickstart).
    """

    split: str = "train"
    normalize: str = "none"
    clip: float | None = None

    def __post_init__(self):
        if self.split not in ("train", "valid"):
            raise ValueError(f"meta_loss.split must be 'train' or 'valid', got {self.split!r}")
        if self.normalize not in ("initial", "none"):
            raise ValueError(f"meta_loss.normalize must be 'initial' or 'none', got {self.normalize!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"meta_loss.clip must be None or positive, got {self.clip}")

    def normalizer(self, init_loss: jax.Array) -> jax.Array:
        """What a term is divided by: the initial loss, or 1 (no normalisation, or an initial
        loss at or below ``NORMALIZER_FLOOR``)."""
        if self.normalize == "none":
            return jnp.ones_like(init_loss)
        return jnp.where(init_loss > NORMALIZER_FLOOR, init_loss, 1.0)

    def term(self, loss: jax.Array, init_loss: jax.Array) -> jax.Array:
        return self.bound(loss / jax.lax.stop_gradient(self.normalizer(init_loss)))

    def bound(self, x: jax.Array) -> jax.Array:
        """With ``clip``: min(x, clip), non-finite values become ``clip``; else x unchanged."""
        if self.clip is None:
            return x
        return jnp.where(jnp.isfinite(x), jnp.minimum(x, self.clip), self.clip)


_MIX_SALT = 0x313C  # self-improving draws (estimators.imitation.MIX_SALT)


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
    # Optional truncation-length schedule. Truncation length is a shape, so lengths are rounded
    # up to power-of-two buckets (<= trunc_length, the maximum) and the steps past the drawn
    # length are masked: one compiled program holds every bucket (`lax.switch`).
    trunc_schedule: Schedule | None = None
    trunc_seed: int = 0
    # Set by MetaTrainer when the particles are sharded over a mesh axis (inside shard_map):
    # num_particles is then the per-device count and estimators key randomness by global index.
    shard_axis: str | None = None
    num_shards: int = 1
    # Training techniques (module docstring); None switches each off.
    replay: Any = None  # estimators.replay.ReplayBuffer
    behaviour_cloning: Any = None  # estimators.imitation.BehaviourCloning
    self_improving: Any = None  # estimators.imitation.SelfImproving

    def __post_init__(self):
        if self.num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {self.num_particles}")
        if self.trunc_length < 1:
            raise ValueError(f"trunc_length must be >= 1, got {self.trunc_length}")
        if self.behaviour_cloning is not None and self.self_improving is not None:
            raise ValueError(
                "behaviour_cloning and self_improving both choose the inner update; enable one"
            )

    def vary(self, tree: Any) -> Any:
        """Mark values created inside ``shard_map`` (zeros, constants) as varying over the
        particle axis, so a ``lax.scan`` carry has the same type in and out."""
        if self.shard_axis is None:
            return tree

        def one(x):
            aval = jax.typeof(x)
            mat = getattr(aval, "mat", None)
            varying = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
            if self.shard_axis in varying:
                return x
            return jax.lax.pcast(x, self.shard_axis, to="varying")

        return jax.tree.map(one, tree)

    @property
    def buckets(self) -> tuple[int, ...]:
        """Compiled truncation lengths: powers of two from the largest one at or below the
        schedule's shortest length, up to ``trunc_length``, then ``trunc_length`` itself."""
        if self.trunc_schedule is None:
            return (self.trunc_length,)
        shortest = min(self.trunc_schedule.min_length, self.trunc_length)
        return power_of_two_buckets(self.trunc_length, 1 << (shortest.bit_length() - 1))

    def truncation_length(self, outer_step: jax.Array) -> jax.Array:
        """This outer step's truncation length (shared by all particles)."""
        if self.trunc_schedule is None:
            return jnp.asarray(self.trunc_length, jnp.int32)
        key = jax.random.fold_in(jax.random.PRNGKey(self.trunc_seed), outer_step)
        return jnp.clip(self.trunc_schedule(key, outer_step), 1, self.trunc_length)

    # -- one particle -------------------------------------------------------------------------

    def fresh_particle(
        self, meta_params: MetaParams, key: jax.Array, outer_step: jax.Array
    ) -> ParticleState:
        """A new trajectory: sample a task instance, initialise it, draw its length."""
        k_spec, k_init, k_len, k_norm = jax.random.split(key, 4)
        spec = self.task_family.sample(k_spec)
        params = self.task_family.init(spec, k_init)
        opt_state = self.learned_opt.optimizer(meta_params).init(params)
        aux = None
        if self.behaviour_cloning is not None:
            aux = self.behaviour_cloning.init(params)
        elif self.self_improving is not None:
            aux = self.self_improving.init(params)
        init_loss = jnp.ones([], jnp.float32)
        if self.meta_loss.normalize == "initial":  # the normaliser: theta-independent by design
            batch = self.task_family.batch(spec, k_norm, self.meta_loss.split)
            init_loss = jax.lax.stop_gradient(self.task_family.loss(spec, params, batch)[0])
        return ParticleState(
            spec=spec,
            params=params,
            opt_state=opt_state,
            step=jnp.zeros([], jnp.int32),
            length=jnp.maximum(self.horizon(k_len, outer_step), 1),
            init_loss=jnp.asarray(init_loss, jnp.float32),
            aux=aux,
        )

    def inner_step(
        self,
        meta_params: MetaParams,
        ps: ParticleState,
        key: jax.Array,
        outer_step: jax.Array,
        *,
        stop_inner_grad: bool = False,
        reset: bool = True,
        replay_state: Any = None,
    ) -> tuple[ParticleState, tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
        """One inner training step of one particle, resetting it if its trajectory ends.

        Returns the new state and (meta-loss term, training loss, done, restored slot or -1):
        the term is the meta-loss of the params after this step's update, the training loss the
        one of the batch the update's gradient came from (before the update).
        ``stop_inner_grad`` cuts the meta-gradient path through the optimizee's gradient (the
        first-order approximation of Andrychowicz et al. 2016, Sec. 2.1). With the replay
        buffer's ``replay_state`` (this particle's, read-only), a reset restores a stored entry
        when the buffer's draw says so (``ReplayBuffer.draw``)."""
        task = self.task_family
        k_batch, k_meta, k_reset = jax.random.split(key, 3)
        batch = task.batch(ps.spec, k_batch, "train")
        (loss, _), grads = jax.value_and_grad(task.loss, argnums=1, has_aux=True)(
            ps.spec, ps.params, batch
        )
        if stop_inner_grad:
            grads = jax.lax.stop_gradient(grads)
        opt = self.learned_opt.optimizer(meta_params)
        updates, opt_state = opt.update(grads, ps.opt_state, ps.params, loss=loss)
        aux, bc = ps.aux, self.behaviour_cloning
        if bc is not None:  # ELO: theta_n + (1 - a) u_teacher + a u_LO, both from theta_n
            alpha = bc.alpha(outer_step)
            updates, aux, bc_dist = bc.fuse(grads, ps.params, loss, updates, aux, alpha)
        elif self.self_improving is not None:
            mix_key = jax.random.fold_in(key, _MIX_SALT)
            updates, aux = self.self_improving.mix(
                grads, ps.params, loss, updates, aux, outer_step, mix_key
            )
        params = optax.apply_updates(ps.params, updates)
        # The meta-loss term scores this update: the loss of the NEW params on a fresh batch of
        # the meta-loss split (Metz et al. 2019: l(x; w(t)) for t = 1..T).
        meta_batch = task.batch(ps.spec, k_meta, self.meta_loss.split)
        term = self.meta_loss.term(task.loss(ps.spec, params, meta_batch)[0], ps.init_loss)
        if bc is not None:
            term = bc.fused_term(self.meta_loss.bound(bc_dist), term, alpha)
        step = ps.step + 1
        done = step >= ps.length
        advanced = ParticleState(ps.spec, params, opt_state, step, ps.length, ps.init_loss, aux)
        restored = jnp.asarray(-1, jnp.int32)
        if not reset:
            return advanced, (term, loss, done, restored)
        fresh = self.fresh_particle(meta_params, k_reset, outer_step)
        if replay_state is not None:
            restore, slot = self.replay.draw(
                replay_state, jax.random.fold_in(key, RESTORE_SALT), outer_step
            )
            fresh = _tree_where(restore, self.replay.lookup(replay_state, slot), fresh)
            restored = jnp.where(done & restore, slot, -1).astype(jnp.int32)
        return _tree_where(done, fresh, advanced), (term, loss, done, restored)

    # -- batches of particles -----------------------------------------------------------------

    def init(self, meta_params: MetaParams, keys: jax.Array) -> UnrollState:
        """Fresh particles, one per key (``keys``: [P, 2]); pass equal keys for antithetic pairs.
        With a replay buffer, each particle also gets an empty buffer."""
        outer_step = jnp.zeros([], jnp.int32)

        def one(key):
            k_fresh, k_stagger = jax.random.split(key)
            ps = self.fresh_particle(meta_params, k_fresh, outer_step)
            if self.stagger:
                u = jax.random.uniform(k_stagger)
                length = jnp.ceil(u * ps.length).astype(jnp.int32)
                ps = ps._replace(length=jnp.clip(length, 1, ps.length))
            return ps

        particles = jax.vmap(one)(keys)
        replay = None
        if self.replay is not None:
            replay = jax.vmap(self.replay.init)(particles)
        return UnrollState(particles, outer_step, replay)

    def unroll(
        self,
        meta_params: MetaParams,
        state: UnrollState,
        keys: jax.Array,
        *,
        per_particle_meta_params: bool = False,
        checkpoint: bool = False,
        stop_inner_grad: bool = False,
    ) -> tuple[UnrollState, UnrollOutput]:
        """Advance every particle by one truncation.

        Args:
          meta_params: shared meta-params, or with a leading particle axis when
            ``per_particle_meta_params`` (ES-type estimators' perturbed copies).
          state: the particles, leading axis P.
          keys: [P, 2] one key per particle; particles with equal keys see the same batches,
            resets and new tasks (antithetic pairs).
          checkpoint: recompute inner steps in the backward pass (``checkpointed_scan``) for
            gradient-based estimators.
          stop_inner_grad: first-order meta-gradients (see ``inner_step``).
        """
        outer_step = state.outer_step
        n_steps = self.truncation_length(outer_step)
        use_replay = self.replay is not None
        if use_replay and state.replay is None:
            raise ValueError("the Unroller has a replay buffer but the UnrollState has none; "
                             "build the state with this Unroller's init")
        # Replay: each particle enqueues the state after step push_index (partners: same key).
        push_index = jax.vmap(
            lambda k: self.replay.push_index(jax.random.fold_in(k, PUSH_SALT), n_steps)
        )(keys) if use_replay else None

        def run(bucket: int):
            def go(theta, particles, keys, replay):
                step_keys = jax.vmap(lambda k: jax.random.split(k, bucket))(keys)  # [P,B,2]

                def one_particle(th, ps, ks, rb, push_at):
                    def body(carry, xs):
                        cur, pushed = carry
                        k, t = xs
                        new, (term, loss, done, restored) = self.inner_step(
                            th, cur, k, outer_step, stop_inner_grad=stop_inner_grad,
                            replay_state=rb,
                        )
                        ran = t < n_steps
                        new = _tree_where(ran, new, cur)
                        if use_replay:
                            pushed = _tree_where(t == push_at, new, pushed)
                        restored = jnp.where(done & ran, restored, -1)
                        return (new, pushed), (term, loss, done & ran, ran, restored)

                    scan = checkpointed_scan if checkpoint else _plain_scan
                    carry = (ps, ps if use_replay else None)
                    return scan(body, carry, (ks, jnp.arange(bucket)), bucket)

                in_axes = (0 if per_particle_meta_params else None, 0, 0, 0, 0)
                (out_particles, pushed), ys = jax.vmap(one_particle, in_axes=in_axes)(
                    theta, particles, step_keys, replay, push_index
                )
                pad = self.trunc_length - bucket
                ys = tuple(
                    jnp.pad(y, ((0, 0), (0, pad)), constant_values=-1 if i == 4 else 0)
                    for i, y in enumerate(ys)
                )
                return out_particles, pushed, ys

            return go

        buckets = self.buckets
        args = (meta_params, state.particles, keys, state.replay)
        if len(buckets) == 1:
            particles, pushed, ys = run(buckets[0])(*args)
        else:
            index = jnp.searchsorted(jnp.asarray(buckets), n_steps)
            branches = [run(b) for b in buckets]
            particles, pushed, ys = jax.lax.switch(index, branches, *args)
        terms, losses, done, mask, restored = ys
        replay, extra = state.replay, {}
        if use_replay:
            extra = dict(restored=restored, push_index=push_index, push_slot=state.replay.head)
            replay = jax.vmap(self.replay.push)(state.replay, pushed)
        return (
            UnrollState(particles, outer_step + 1, replay),
            UnrollOutput(terms, losses, done, mask, **extra),
        )

    def trajectory(
        self,
        meta_params: MetaParams,
        keys: jax.Array,
        length: jax.Array,
        max_length: int,
        *,
        outer_step: jax.Array,
        per_particle_meta_params: bool = False,
    ) -> tuple[ParticleState, UnrollOutput]:
        """Run fresh trajectories of ``length`` steps (<= ``max_length``, a shape) without resets.

        Used by full-trajectory estimators; returns the final particle states (before any
        reset) and the per-step outputs, masked past ``length``."""

        def one_particle(theta, key):
            k_init, k_steps = jax.random.split(key)
            ps = self.vary(self.fresh_particle(theta, k_init, outer_step)._replace(length=length))

            def body(carry, xs):
                k, t = xs
                new, (term, loss, done, _) = self.inner_step(theta, carry, k, outer_step, reset=False)
                ran = t < length
                return _tree_where(ran, new, carry), (term, loss, done & ran, ran)

            xs = (jax.random.split(k_steps, max_length), jnp.arange(max_length))
            return jax.lax.scan(body, ps, xs)

        in_axes = (0 if per_particle_meta_params else None, 0)
        final, (terms, losses, done, mask) = jax.vmap(one_particle, in_axes=in_axes)(meta_params, keys)
        return final, UnrollOutput(terms, losses, done, mask)


def unroll_metrics(unroller: Unroller, out: UnrollOutput, particles: ParticleState,
                   *, pairs: bool = False) -> dict[str, jax.Array]:
    """Metrics every estimator reports about its unroll.

    ``inner_loss``: mean training-batch loss over the steps that ran; ``inner_steps``: steps
    run (all particles); ``trajectories_done``: trajectories that ended (per pair when ``pairs``:
    antithetic partners share theirs); ``unnormalized_share``: with ``normalize="initial"``,
    the share of particles whose initial loss was ~0 and whose terms are therefore left
    unnormalised (0 otherwise)."""
    done = out.done[0::2] if pairs else out.done
    unnormalized = jnp.zeros([], jnp.float32)
    if unroller.meta_loss.normalize == "initial":
        unnormalized = jnp.mean((particles.init_loss <= NORMALIZER_FLOOR).astype(jnp.float32))
    return {
        "inner_loss": out.step_mean(out.raw_losses).mean(),
        "inner_steps": out.mask.sum(),
        "trajectories_done": done.sum(),
        "unnormalized_share": unnormalized,
    }


def _plain_scan(body, carry, xs, length):
    del length
    return jax.lax.scan(body, carry, xs)
