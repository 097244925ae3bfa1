"""The inner-unroll engine shared by every gradient estimator (DESIGN.md, "estimators/").

An :class:`Unroller` advances a batch of *particles* (one task instance and one inner trajectory
each) by one truncation of ``trunc_length`` inner steps with ``lax.scan`` under ``vmap``. It is
built from the task family, ONE inner-update factory ``learned_opt`` (``meta_params ->
optax.GradientTransformationExtraArgs``: a learned optimizer, or a wrapper of one from
``lopt.wrappers`` such as ELO behaviour cloning), ONE reset policy (``estimators.resets``), the
unroll settings (particles, truncation length, horizon schedule) and the meta-loss
(``estimators.meta_loss``).

Per particle it keeps a :class:`ParticleState`: task spec, params, optimizer state, position in
its trajectory (``step``: inner steps taken) and trajectory length. A truncation:

1. :meth:`Unroller.begin`: this outer step's truncation length, the particles' keys, and the
   reset policy's draw (which particles start from a stored state, and where each offers its
   state back);
2. :meth:`Unroller.run`: per particle, the starting state (:meth:`Unroller.start`: the reset
   policy's at the one point where it is asked, the truncation's first step; a particle whose
   trajectory ended starts a fresh one), then the inner steps (:meth:`Unroller.body`); a
   trajectory that reaches its length mid-truncation continues with a fresh one
   (:meth:`Unroller.restart`, prepared once per truncation, not per step);
3. :meth:`Unroller.finish`: the reset policy observes the offered states.

What an estimator needs from the unroll is a field it sets with ``dataclasses.replace``, as the
trainer sets the sharding (:meth:`Unroller.sharded`): ``pairs`` (antithetic partners share
keys), ``per_particle`` (meta-params with a leading particle axis: perturbed copies),
``checkpoint`` (recompute inner steps in the backward pass), ``first_order`` (no gradient
through the optimizee's gradients) and ``vmapped`` (the caller maps ``run`` over an axis of its
own). It returns per-step meta-loss terms, masks and a typed :class:`ResetInfo`, so each
estimator attributes every step's loss to the trajectory it belongs to. It never counts outer
steps: the run's one clock, ``MetaTrainState.outer_step``, is passed in.

The meta-loss term of an update is defined once, :meth:`Unroller.score` (``estimators.meta_loss``
for the definition). With the ``train`` split the loss it scores is the next step's training
loss, which the unroll computes anyway for that step's gradient (a fresh training batch,
independent of what produced the params): :meth:`Unroller.scores_next_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from estimators import keys as keys_lib
from estimators.meta_loss import NORMALIZER_FLOOR, MetaLoss
from estimators.resets import FreshReset
from estimators.scan import checkpointed_scan, plain_scan
from estimators.schedules import Schedule, power_of_two_buckets
from lopt.base import MetaParams, build_optimizer
from lopt.wrappers import meta_term
from tasks.base import TaskFamily


class ParticleState(NamedTuple):
    """One inner trajectory (batched over particles by a leading axis)."""

    spec: Any
    params: Any
    opt_state: Any
    step: jax.Array  # int32: the position, inner steps taken in this trajectory
    length: jax.Array  # int32: this trajectory's horizon
    init_loss: jax.Array  # float32: loss of the initial params on the meta-loss split (normaliser)


class UnrollState(NamedTuple):
    particles: ParticleState  # per particle (sharded over devices)
    reset_state: Any = None  # the reset policy's state (replicated on every device)


class ResetInfo(NamedTuple):
    """What each particle started the truncation from (leading axis P)."""

    carried: jax.Array  # bool: continued its own trajectory from the previous truncation
    restored: jax.Array  # bool: started from a state the reset policy stored (ELO's buffer)
    start_position: jax.Array  # int32: position K at the truncation's first step


class Steps(NamedTuple):
    """Per-step outputs of a truncation ([P, T]; steps past a drawn length are padding)."""

    losses: jax.Array  # meta-loss terms (normalised/clipped as MetaLoss says)
    raw_losses: jax.Array  # training-batch losses (before each update)
    done: jax.Array  # bool: the trajectory reached its length at this step
    reset: jax.Array  # bool: the particle started a new trajectory at this step
    mask: jax.Array  # bool: the step ran (False past a scheduled truncation length)
    unnormalized: jax.Array  # bool: normalize="initial" but the initial loss was ~0


class UnrollOutput(NamedTuple):
    losses: jax.Array  # [P, T] meta-loss terms (normalised/clipped as MetaLoss says)
    raw_losses: jax.Array  # [P, T] training-batch losses (before each update)
    done: jax.Array  # [P, T] bool: the trajectory reached its length at this step
    reset: jax.Array  # [P, T] bool: the particle started a new trajectory at this step
    mask: jax.Array  # [P, T] bool: the step ran (False past a scheduled truncation length)
    unnormalized: jax.Array  # [P, T] bool: normalize="initial" but the initial loss was ~0
    info: ResetInfo  # [P] how the truncation started
    position: jax.Array  # [P] int32: position at the end of the truncation
    extras: dict = {}  # the inner-update wrapper's own metrics (e.g. behaviour cloning's a_t)

    def step_mean(self, x: jax.Array | None = None) -> jax.Array:
        """Mean of ``x`` (default: the meta-loss terms) over the steps that ran, per particle."""
        x = self.losses if x is None else x
        m = self.mask.astype(x.dtype)
        return (x * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)

    def step_weights(self) -> jax.Array:
        """[P, T] weights w_t with sum_t w_t x_t = step_mean(x): 1/T_run on steps that ran."""
        m = self.mask.astype(jnp.float32)
        return m / jnp.maximum(m.sum(-1, keepdims=True), 1.0)


class SegmentStart(NamedTuple):
    """Per particle (leading axis P), what ``begin`` drew for a truncation."""

    keys: jax.Array  # [P, 2]
    restore: jax.Array  # [P] bool
    restored: Any  # [P, ...] ParticleState (None for a policy that never restores)
    push_at: jax.Array | None  # [P] int32, or None


class Truncation(NamedTuple):
    n_steps: jax.Array  # int32: this truncation's length (shared by all particles)
    start: SegmentStart


class _Segment(NamedTuple):
    """What every step of one truncation reads (the body's constants)."""

    theta: Any  # meta-params (leading particle axis when ``per_particle``)
    fresh: ParticleState  # [P, F, ...] fresh trajectories prepared for this truncation
    n_steps: jax.Array  # int32: the steps that run
    outer_step: jax.Array  # the run's clock
    push_at: jax.Array | None  # [P] int32: after which step each particle offers its state
    carried: jax.Array  # [P] bool: continued its trajectory from the previous truncation
    every_step_runs: bool  # static: no scheduled truncation shorter than the bucket


def tree_where(cond: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def step_keys(key: jax.Array) -> jax.Array:
    """[4, 2]: an inner step's keys for its training batch, its meta-loss batch, the
    inner-update wrapper's own draws, and the batch that scores an ending trajectory's last
    update (``restart``, train split). The unroll draws them for every step of a truncation at
    once, outside the scan (one vectorised draw instead of small ones per step)."""
    k_batch, k_meta, k_update = jax.random.split(key, 3)
    return jnp.stack([k_batch, k_meta, keys_lib.salted(k_update, keys_lib.INNER_UPDATE),
                      keys_lib.salted(k_batch, keys_lib.FRESH)])


def _where_particles(cond: jax.Array, a: Any, b: Any) -> Any:
    """Per particle: ``a`` where ``cond`` [P] holds, else ``b`` (leaves with a leading P axis)."""
    return jax.tree.map(lambda x, y: jnp.where(cond.reshape(cond.shape + (1,) * (x.ndim - 1)), x, y), a, b)


@dataclasses.dataclass(frozen=True)
class Unroller:
    """Runs truncations of inner training for a batch of particles (see module docstring).

    stagger: the first trajectories get lengths uniform in [1, L], so resets are spread out.
    trunc_schedule: optional truncation-length schedule. The truncation length is a shape, so
      drawn lengths are rounded up to power-of-two buckets (up to ``trunc_length``, the
      maximum) and the steps past the drawn length are masked: one compiled program holds every
      bucket (``lax.switch``).
    shard_axis, num_shards: set by the trainer (:meth:`sharded`) when particles are sharded
      over a mesh axis: ``num_particles`` is then the per-device count.
    pairs, per_particle, checkpoint, first_order, vmapped: what the estimator needs (module
      docstring); each estimator sets its own with ``dataclasses.replace``.
    particle_chunk: an execution option (results equal to float rounding): run a truncation's
      particles in groups of this many, one group after another (``lax.map``), each group
      through all its inner steps. A memory lever: a compiled W1 step at 256 particles needs
      0.66x (PES) / 0.38x (TBPTT) the temporary memory with groups of 64, at the same speed on
      a 2-core CPU (docs/performance.md, "Particles"). 0 (default): every particle in one
      group. Must divide the (per-device) particle count, and be even with ``pairs``; the
      particle count or more means one group.
    """

    task_family: TaskFamily
    learned_opt: Any  # the inner-update factory: .init(key), .optimizer(meta_params)
    num_particles: int
    trunc_length: int
    horizon: Schedule
    meta_loss: MetaLoss = MetaLoss()
    reset: Any = FreshReset()  # estimators.resets policy
    trunc_schedule: Schedule | None = None
    stagger: bool = True
    shard_axis: str | None = None
    num_shards: int = 1
    pairs: bool = False  # antithetic partners 2i, 2i + 1 share keys (task, batches, resets)
    per_particle: bool = False  # run()'s meta-params have a leading particle axis
    checkpoint: bool = False  # backprop stores O(sqrt(T)) carries (checkpointed_scan)
    first_order: bool = False  # no meta-gradient through the optimizee's gradients
    vmapped: bool = False  # run() is mapped over an axis of the caller's (merged's pairs)
    particle_chunk: int = 0  # particles per group in run() (0: all at once); see above

    def __post_init__(self):
        if isinstance(self.num_particles, bool) or int(self.num_particles) < 1:
            raise ValueError(f"num_particles must be >= 1, got {self.num_particles}")
        if isinstance(self.trunc_length, bool) or int(self.trunc_length) < 1:
            raise ValueError(f"trunc_length must be >= 1, got {self.trunc_length}")
        c = self.particle_chunk
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"particle_chunk must be an integer >= 0, got {c!r}")

    def sharded(self, axis: str, num_shards: int) -> "Unroller":
        """This unroller as one device's shard: ``num_particles / num_shards`` particles inside
        ``shard_map`` over ``axis`` (randomness stays keyed by global particle index)."""
        return dataclasses.replace(
            self, num_particles=self.num_particles // num_shards, shard_axis=axis, num_shards=num_shards
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

    # -- lengths --------------------------------------------------------------------------------

    @property
    def buckets(self) -> tuple[int, ...]:
        """Compiled truncation lengths: powers of two from the largest one at or below the
        schedule's shortest length, up to ``trunc_length``, then ``trunc_length`` itself (one
        bucket when the schedule never draws less than ``trunc_length``)."""
        if self.trunc_schedule is None or self.trunc_schedule.min_length >= self.trunc_length:
            return (self.trunc_length,)
        shortest = self.trunc_schedule.min_length
        return power_of_two_buckets(self.trunc_length, 1 << (shortest.bit_length() - 1))

    def truncation_length(self, key: jax.Array, outer_step: jax.Array) -> jax.Array:
        """This outer step's truncation length (shared by all particles), drawn from the run's
        key: another ``config.seed`` draws other lengths."""
        if self.trunc_schedule is None:
            return jnp.asarray(self.trunc_length, jnp.int32)
        k = keys_lib.salted(key, keys_lib.TRUNCATION_LENGTH)
        return jnp.clip(self.trunc_schedule(k, outer_step), 1, self.trunc_length).astype(jnp.int32)

    def fresh_per_truncation(self, bucket: int) -> int:
        """Fresh trajectories prepared per particle for a truncation of ``bucket`` steps: enough
        for every reset it can hold (a start plus one per ``horizon.min_length`` steps)."""
        return 1 + (bucket - 1) // max(1, int(self.horizon.min_length))

    # -- one particle ---------------------------------------------------------------------------

    def fresh_particle(self, meta_params: MetaParams, key: jax.Array, outer_step: jax.Array) -> ParticleState:
        """A new trajectory: sample a task instance, initialise it, draw its length from the
        horizon schedule at ``outer_step``, and (with ``normalize="initial"``) measure its
        initial loss."""
        k_spec, k_init, k_len, k_norm = jax.random.split(key, 4)
        task = self.task_family
        spec = task.sample(k_spec)
        params = task.init(spec, k_init)
        init_loss = jnp.ones([], jnp.float32)
        if self.meta_loss.normalize == "initial":  # the normaliser: theta-independent by design
            batch = task.batch(spec, k_norm, self.meta_loss.split)
            init_loss = jax.lax.stop_gradient(task.loss(spec, params, batch)[0])
        length = jnp.maximum(self.horizon(k_len, outer_step).astype(jnp.int32), 1)
        # The trajectory's horizon reaches optimizers that read it (velo: num_steps).
        opt = build_optimizer(self.learned_opt, meta_params, num_steps=length)
        return ParticleState(
            spec=spec,
            params=params,
            opt_state=opt.init(params),
            step=jnp.zeros([], jnp.int32),
            length=length,
            init_loss=jnp.asarray(init_loss, jnp.float32),
        )

    def score(self, ps: ParticleState, loss: jax.Array) -> jax.Array:
        """THE meta-loss term of the update that produced ``ps``, given the loss of its params on
        a batch of the meta-loss split: normalised and clipped as ``meta_loss`` says, fused with
        the inner-update wrapper's own term (``ps.opt_state`` holds it after the update)."""
        return meta_term(self.learned_opt, ps.opt_state, self.meta_loss.term(loss, ps.init_loss))

    def meta_forward(self, ps: ParticleState, key: jax.Array) -> jax.Array:
        """:meth:`score` on a fresh batch of the meta-loss split drawn with ``key``."""
        task = self.task_family
        batch = task.batch(ps.spec, key, self.meta_loss.split)
        return self.score(ps, task.loss(ps.spec, ps.params, batch)[0])

    @property
    def scores_next_batch(self) -> bool:
        """Whether an update is scored with the next step's training loss (measured before that
        step's update, on a fresh training batch): with the train split it is the same quantity
        as a separate forward on a fresh batch, l(x; w(t)) with x independent of what produced
        w(t), and saves that forward at every step. Only an update with no next step in its
        trajectory (the truncation's last, or a trajectory's last) takes its own forward."""
        return self.meta_loss.split == "train"

    def inner_step(
        self, meta_params: MetaParams, ps: ParticleState, key: jax.Array, outer_step: jax.Array,
    ) -> tuple[ParticleState, jax.Array]:
        """One inner training step of one particle: (new state, the training loss of the batch
        the update's gradient came from, before the update). With ``first_order`` the
        meta-gradient path through the optimizee's gradient is cut (the first-order
        approximation of Andrychowicz et al. 2016, Sec. 2.1). ``key`` is the step's key, or its
        keys already drawn (:func:`step_keys`)."""
        task = self.task_family
        k_batch, _, k_update = (step_keys(key) if keys_lib.is_single(key) else key)[:3]
        batch = task.batch(ps.spec, k_batch, "train")
        (loss, _), grads = jax.value_and_grad(task.loss, argnums=1, has_aux=True)(
            ps.spec, ps.params, batch
        )
        if self.first_order:
            grads = jax.lax.stop_gradient(grads)
        opt = self.learned_opt.optimizer(meta_params)
        updates, opt_state = opt.update(
            grads, ps.opt_state, ps.params, value=loss, outer_step=outer_step, key=k_update
        )
        params = optax.apply_updates(ps.params, updates)
        return ParticleState(ps.spec, params, opt_state, ps.step + 1, ps.length, ps.init_loss), loss

    # -- batches of particles -------------------------------------------------------------------

    def init(self, meta_params: MetaParams, key: jax.Array) -> UnrollState:
        """Fresh particles (antithetic partners share their task when ``pairs``) and the reset
        policy's initial state."""
        keys = self.particle_keys(key)
        zero = jnp.zeros([], jnp.int32)

        def one(k):
            k_fresh, k_stagger = jax.random.split(k)
            ps = self.fresh_particle(meta_params, k_fresh, zero)
            if self.stagger:
                u = jax.random.uniform(k_stagger)
                length = jnp.ceil(u * ps.length).astype(jnp.int32)
                ps = ps._replace(length=jnp.clip(length, 1, ps.length))
            return ps

        particles = jax.vmap(one)(keys)
        example = jax.tree.map(lambda x: x[0], particles)
        return UnrollState(particles, self.reset.init(example))

    def particle_keys(self, key: jax.Array) -> jax.Array:
        fn = keys_lib.pair_keys if self.pairs else keys_lib.particle_keys
        return fn(keys_lib.salted(key, keys_lib.PARTICLES), self.num_particles, self.shard_axis)

    def begin(self, state: UnrollState, key: jax.Array, outer_step: jax.Array) -> Truncation:
        """This truncation's length, the particles' keys and the reset policy's draws."""
        n_steps = self.truncation_length(key, outer_step)
        keys = self.particle_keys(key)
        restore, restored = self.reset.draw(state.reset_state, keys, outer_step)
        push_at = self.reset.push_index(keys, n_steps)
        return Truncation(n_steps, SegmentStart(keys, restore, restored, push_at))

    def start(self, bucket: int, outer_step: jax.Array, theta: MetaParams, ps: ParticleState,
              start: SegmentStart, restored: ParticleState | None):
        """One particle's start of a truncation of ``bucket`` steps: (its fresh trajectories
        for the truncation, its starting state, fresh ones used, :class:`ResetInfo`, its
        steps' keys). It continues its own trajectory unless that ended or the reset policy
        starts every segment anew (then a fresh one), or the policy restores a stored state."""
        count = self.fresh_per_truncation(bucket)
        k_fresh, k_steps = jax.random.split(start.keys)
        fresh = jax.vmap(lambda k: self.fresh_particle(theta, k, outer_step))(
            jax.random.split(keys_lib.salted(k_fresh, keys_lib.FRESH), count))
        new_start = (ps.step >= ps.length) | self.reset.segment_reset
        begin = tree_where(new_start, jax.tree.map(lambda x: x[0], fresh), ps)
        if restored is not None:
            begin = tree_where(start.restore, restored, begin)
        used = jnp.where(~start.restore & new_start, 1, 0).astype(jnp.int32)
        info = ResetInfo(~start.restore & ~new_start, start.restore, begin.step)
        return fresh, begin, used, info, jax.vmap(step_keys)(jax.random.split(k_steps, bucket))

    def restart(self, seg: _Segment, cur: ParticleState, used: jax.Array, need: jax.Array,
                key: jax.Array) -> tuple[jax.Array | None, ParticleState]:
        """Particles whose trajectory ended (``need`` [P]) continue with their next fresh one:
        (the term of each ending trajectory's last update, scored on a batch of its own when
        :meth:`scores_next_batch`, else None; the particles). Most steps end no trajectory, so
        unless ``vmapped`` (where the predicate is batched and a cond would run both branches)
        this runs under a ``lax.cond`` that skips the forward and the state select."""
        count = seg.fresh.step.shape[1]
        forward = jax.vmap(self.meta_forward) if self.scores_next_batch else None

        def swap():
            nxt = jax.vmap(lambda f, u: jax.tree.map(lambda x: x[jnp.minimum(u, count - 1)], f))(
                seg.fresh, used)
            return (forward(cur, key) if forward else None), _where_particles(need, nxt, cur)

        if self.vmapped:
            return swap()

        def keep():
            if forward is None:
                return None, cur
            shape = jax.eval_shape(forward, cur, key)
            return self.vary(jnp.zeros(shape.shape, shape.dtype)), cur

        return jax.lax.cond(jnp.any(need), swap, keep)

    def body(self, seg: _Segment, carry: tuple, xs: tuple) -> tuple[tuple, Steps]:
        """Inner step ``t`` of a truncation for every particle: restart ended trajectories, take
        the step, score the update (or, with :meth:`scores_next_batch`, the previous one), and
        offer the state to the reset policy at its push step."""
        cur, used, offered = carry
        k, t = xs  # k: [P, 4, 2] (step_keys)
        ran = t < seg.n_steps
        need = (cur.step >= cur.length) & ran  # mid-truncation end: continue fresh
        ended, cur = self.restart(seg, cur, used, need, k[:, 3])
        used = used + need.astype(jnp.int32)
        axis = 0 if self.per_particle else None
        new, loss = jax.vmap(self.inner_step, in_axes=(axis, 0, 0, None))(seg.theta, cur, k, seg.outer_step)
        if self.scores_next_batch:  # this step's training loss scores the previous update
            term = jnp.where(need, ended, jax.vmap(self.score)(cur, loss))
        else:
            term = jax.vmap(self.meta_forward)(new, k[:, 1])
        # Without a truncation schedule every step runs; selecting by `ran` would copy for nothing.
        new = self.vary(new) if seg.every_step_runs else _where_particles(ran, new, cur)
        if offered is not None:
            offered = _where_particles(t == seg.push_at, new, offered)
        raw = self.meta_loss.normalize == "initial"
        out = Steps(term, loss, (new.step >= cur.length) & ran, (need | ((t == 0) & ~seg.carried)) & ran,
                    jnp.broadcast_to(ran, need.shape), (cur.init_loss <= NORMALIZER_FLOOR) & ran & raw)
        return (new, used, offered), out

    def run(self, meta_params: MetaParams, particles: ParticleState, trunc: Truncation,
            outer_step: jax.Array) -> tuple[ParticleState, Any, Steps, ResetInfo, dict]:
        """The inner steps of one truncation for the particles of ``trunc`` (differentiable in
        ``meta_params``). Returns (final states, offered states or None, per-step outputs
        padded to ``trunc_length``, reset info, the inner-update wrapper's metrics of the final
        states). One compiled program holds every bucket of truncation length."""
        count = particles.step.shape[0]
        chunk = self.particle_chunk
        if not chunk or chunk >= count:
            return self._run_group(meta_params, particles, trunc, outer_step)
        if count % chunk or (self.pairs and chunk % 2):
            raise ValueError(f"particle_chunk {chunk} must divide the {count} particles of a "
                             f"device{' and be even (antithetic pairs)' if self.pairs else ''}")
        # Groups one after another: lax.map is a scan over the groups, so its backward pass
        # keeps each group's residuals as the unchunked run keeps all of them (no more memory).
        split = functools.partial(jax.tree.map, lambda x: x.reshape((count // chunk, chunk) + x.shape[1:]))
        merge = functools.partial(jax.tree.map, lambda x: x.reshape((count,) + x.shape[2:]))

        def group(xs):
            theta, ps, start = xs
            theta = meta_params if theta is None else theta
            return self._run_group(theta, ps, trunc._replace(start=start), outer_step)

        theta = split(meta_params) if self.per_particle else None
        end, offered, steps, info, extras = jax.lax.map(group, (theta, split(particles), split(trunc.start)))
        # extras: per-group means over equal-sized groups; their mean is the mean over all.
        return merge(end), merge(offered), merge(steps), merge(info), jax.tree.map(jnp.mean, extras)

    def _run_group(self, meta_params, particles, trunc, outer_step):
        """:meth:`run` for one group of particles (all of them unless ``particle_chunk``)."""
        args = (meta_params, particles, trunc.start._replace(restored=None), trunc.start.restored,
                trunc.n_steps, outer_step)
        if len(self.buckets) == 1:
            return self._run_bucket(self.buckets[0], *args)
        index = jnp.searchsorted(jnp.asarray(self.buckets), trunc.n_steps)
        return jax.lax.switch(index, [functools.partial(self._run_bucket, b) for b in self.buckets], *args)

    def _run_bucket(self, bucket, theta, particles, start, restored, n_steps, outer_step):
        axis = 0 if self.per_particle else None
        fresh, begin, used, info, keys = jax.vmap(
            functools.partial(self.start, bucket, outer_step), in_axes=(axis, 0, 0, 0)
        )(theta, particles, start, restored)
        # The barrier keeps fresh states XLA can fold to constants (zero momenta) as one
        # buffer: folded, they are sunk into the loop and re-broadcast at every step as the
        # restart cond's operand (256 particles: 4% of W1's kernel time).
        fresh = jax.lax.optimization_barrier(self.vary(fresh))
        every = self.trunc_schedule is None and bucket == self.trunc_length
        seg = _Segment(theta, fresh, n_steps, outer_step, start.push_at, info.carried, every)
        offer = start.push_at is not None
        carry = self.vary((begin, used, begin if offer else None))
        scan = checkpointed_scan if self.checkpoint else plain_scan
        xs = (jnp.swapaxes(keys, 0, 1), jnp.arange(bucket))
        (end, _, offered), steps = scan(functools.partial(self.body, seg), carry, xs, bucket)
        steps = Steps(*(jnp.swapaxes(y, 0, 1) for y in steps))  # [T, P] -> [P, T]
        if self.scores_next_batch:  # terms[t] was measured at step t + 1; the last one here
            last = jax.vmap(self.meta_forward)(end, keys[:, -1, 3])
            steps = steps._replace(losses=jnp.concatenate([steps.losses[:, 1:], last[:, None]], axis=1))
        pad = ((0, 0), (0, self.trunc_length - bucket))
        steps = Steps(*(jnp.pad(y, pad) for y in steps))
        return end, offered, steps, info, self.update_metrics(end)

    def update_metrics(self, particles: ParticleState) -> dict[str, jax.Array]:
        """The inner-update wrapper's metrics (its ``metrics(opt_state)``), averaged over the
        particles; {} for a plain learned optimizer."""
        fn = getattr(self.learned_opt, "metrics", None)
        if fn is None:
            return {}
        return {k: jnp.mean(v) for k, v in jax.vmap(fn)(particles.opt_state).items()}

    def finish(self, state: UnrollState, particles: ParticleState, offered: Any) -> UnrollState:
        """The new unroll state: the final particles, and the reset policy's state after it
        observed the offered states (a state at its trajectory's end is not offered; antithetic
        partners offer once, the positive member)."""
        reset_state = state.reset_state
        if offered is not None:
            valid = offered.step < offered.length
            if self.pairs:
                valid = valid & (jnp.arange(valid.shape[0]) % 2 == 0)
            reset_state = self.reset.observe(reset_state, offered, valid, self.shard_axis, self.num_shards)
        return UnrollState(particles, reset_state)

    def unroll(self, meta_params: MetaParams, state: UnrollState, key: jax.Array,
               outer_step: jax.Array) -> tuple[UnrollState, UnrollOutput]:
        """Advance every particle by one truncation (``begin``, ``run``, ``finish``).

        ``meta_params``: shared, or with a leading particle axis when ``per_particle`` (ES-type
        estimators' perturbed copies); ``key``: this outer step's key (particles' keys derive
        from it by global index); ``outer_step``: the run's clock."""
        trunc = self.begin(state, key, outer_step)
        end, offered, steps, info, extras = self.run(meta_params, state.particles, trunc, outer_step)
        return self.finish(state, end, offered), self.output(end, steps, info, extras)

    @staticmethod
    def output(end: ParticleState, steps: Steps, info: ResetInfo, extras: dict) -> UnrollOutput:
        """The :class:`UnrollOutput` of a truncation that ended in ``end``."""
        return UnrollOutput(*steps, info=info, position=end.step, extras=extras)


__all__ = ["MetaLoss", "ParticleState", "ResetInfo", "Truncation", "UnrollOutput", "UnrollState",
           "Unroller", "step_keys", "tree_where"]
