"""The inner-unroll engine shared by every gradient estimator (DESIGN.md, "estimators/").

An :class:`Unroller` advances a batch of *particles* (one task instance and one inner trajectory
each) by one truncation of ``trunc_length`` inner steps with ``lax.scan`` under ``vmap``. It is
built from the task family, ONE inner-update factory ``learned_opt`` (``meta_params ->
optax.GradientTransformationExtraArgs``: a learned optimizer, or a wrapper of one from
``lopt.wrappers`` such as ELO behaviour cloning), ONE reset policy (``estimators.resets``), the
unroll settings (particles, truncation length, horizon schedule) and the meta-loss.

Per particle it keeps a :class:`ParticleState`: task spec, params, optimizer state, position in
its trajectory (``step``: inner steps taken) and trajectory length. A truncation:

1. ``begin``: this outer step's truncation length, the particles' keys, and the reset policy's
   draw (which particles start from a stored state, and where each offers its state back);
2. ``run``: per particle, the starting state (the reset policy's at the one point where it is
   asked: the truncation's first step; a particle whose trajectory ended starts a fresh one),
   then the inner steps; a trajectory that reaches its length mid-truncation continues with a
   fresh one (prepared once per truncation, not per step);
3. ``finish``: the reset policy observes the offered states.

It returns per-step meta-loss terms, masks and a typed :class:`ResetInfo`, so each estimator
attributes every step's loss to the trajectory it belongs to. It never counts outer steps: the
run's one clock, ``MetaTrainState.outer_step``, is passed in (schedules, alpha ramps, the reset
policy's t > 0 gate read it).

Meta-loss (one definition for every estimator, :class:`MetaLoss`): per inner step, the loss of
the parameters AFTER that step's update, on a fresh batch of the ``split`` ("train" or "valid")
drawn independently of the batch the update's gradient used. A truncation of T steps from
position K therefore scores the T updates it made, f(theta_{K+1}) ... f(theta_{K+T}): Metz et
al. 2019, Figure 1, L_train(theta) = E_{x ~ D_train}[1/T sum_{t=1..T} l(x; w(t))], and L_valid
likewise with D_valid. Two options, both off by default (the papers' objective is the plain
mean): ``normalize="initial"`` divides each term by the loss of the trajectory's initial
parameters (on a batch of the same split, under ``stop_gradient``: it does not depend on the
meta-params), so task instances of different loss scales weigh alike; ``clip`` bounds each term
(and turns a non-finite one into ``clip``) so a diverging inner run cannot dominate. A wrapper
with a ``meta_term`` (behaviour cloning) fuses its own term in (``lopt.wrappers.meta_term``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from estimators import keys as keys_lib
from estimators.resets import FreshReset
from estimators.schedules import Schedule, power_of_two_buckets
from lopt.base import MetaParams
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

    def at_bound(self, x: jax.Array) -> jax.Array:
        """bool: the term sits at the clip (or is non-finite): it carries no gradient."""
        if self.clip is None:
            return ~jnp.isfinite(x)
        return ~jnp.isfinite(x) | (x >= self.clip)


def tree_where(cond: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def step_keys(key: jax.Array) -> jax.Array:
    """[4, 2]: an inner step's keys for its training batch, its meta-loss batch, the
    inner-update wrapper's own draws, and the batch that scores an ending trajectory's last
    update (``run``, train split). The unroll draws them for every step of a truncation at
    once, outside the scan (one vectorised draw instead of small ones per step)."""
    k_batch, k_meta, k_update = jax.random.split(key, 3)
    return jnp.stack([k_batch, k_meta, keys_lib.salted(k_update, keys_lib.INNER_UPDATE),
                      keys_lib.salted(k_batch, keys_lib.FRESH)])


def _where_particles(cond: jax.Array, a: Any, b: Any) -> Any:
    """Per particle: ``a`` where ``cond`` [P] holds, else ``b`` (leaves with a leading P axis)."""
    return jax.tree.map(lambda x, y: jnp.where(cond.reshape(cond.shape + (1,) * (x.ndim - 1)), x, y), a, b)


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


def _plain_scan(body, carry, xs, length):
    del length
    return jax.lax.scan(body, carry, xs)


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

    def __post_init__(self):
        if isinstance(self.num_particles, bool) or int(self.num_particles) < 1:
            raise ValueError(f"num_particles must be >= 1, got {self.num_particles}")
        if isinstance(self.trunc_length, bool) or int(self.trunc_length) < 1:
            raise ValueError(f"trunc_length must be >= 1, got {self.trunc_length}")

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
        schedule's shortest length, up to ``trunc_length``, then ``trunc_length`` itself."""
        if self.trunc_schedule is None:
            return (self.trunc_length,)
        shortest = min(self.trunc_schedule.min_length, self.trunc_length)
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
        return ParticleState(
            spec=spec,
            params=params,
            opt_state=self.learned_opt.optimizer(meta_params).init(params),
            step=jnp.zeros([], jnp.int32),
            length=jnp.maximum(self.horizon(k_len, outer_step).astype(jnp.int32), 1),
            init_loss=jnp.asarray(init_loss, jnp.float32),
        )

    def meta_forward(self, ps: ParticleState, key: jax.Array) -> jax.Array:
        """The meta-loss term of the update that produced ``ps``: the loss of its params on a
        fresh batch of the meta-loss split, normalised/clipped as ``meta_loss`` says, fused with
        the inner-update wrapper's own term (``ps.opt_state`` holds it after the update)."""
        task = self.task_family
        batch = task.batch(ps.spec, key, self.meta_loss.split)
        return self.score(ps, task.loss(ps.spec, ps.params, batch)[0])

    def score(self, ps: ParticleState, loss: jax.Array) -> jax.Array:
        """The meta-loss term of the update that produced ``ps``, given the loss of its params."""
        return meta_term(self.learned_opt, ps.opt_state, self.meta_loss.term(loss, ps.init_loss))

    @property
    def scores_next_batch(self) -> bool:
        """Whether a step's training loss (measured before its update, on a fresh training
        batch) scores the previous update: with the train split it is the same quantity as a
        separate forward on a fresh batch, l(x; w(t)) with x independent of what produced w(t),
        and saves that forward (see ``run``)."""
        return self.meta_loss.split == "train"

    def inner_step(
        self,
        meta_params: MetaParams,
        ps: ParticleState,
        key: jax.Array,
        outer_step: jax.Array,
        *,
        stop_inner_grad: bool = False,
        score: bool = True,
    ) -> tuple[ParticleState, tuple[jax.Array | None, jax.Array, jax.Array]]:
        """One inner training step of one particle: (new state, (meta-loss term, training
        loss, done)). The term is the meta-loss of the params after this step's update (None
        when ``score`` is False: the next step's training loss scores it); the training loss
        the one of the batch the update's gradient came from (before the update).
        ``stop_inner_grad`` cuts the meta-gradient path through the optimizee's gradient (the
        first-order approximation of Andrychowicz et al. 2016, Sec. 2.1). ``key`` is the step's
        key, or its keys already drawn (:func:`step_keys`)."""
        task = self.task_family
        k_batch, k_meta, k_update = (step_keys(key) if keys_lib.is_single(key) else key)[:3]
        batch = task.batch(ps.spec, k_batch, "train")
        (loss, _), grads = jax.value_and_grad(task.loss, argnums=1, has_aux=True)(
            ps.spec, ps.params, batch
        )
        if stop_inner_grad:
            grads = jax.lax.stop_gradient(grads)
        opt = self.learned_opt.optimizer(meta_params)
        updates, opt_state = opt.update(
            grads, ps.opt_state, ps.params, loss=loss, outer_step=outer_step, key=k_update
        )
        params = optax.apply_updates(ps.params, updates)
        step = ps.step + 1
        new = ParticleState(ps.spec, params, opt_state, step, ps.length, ps.init_loss)
        term = None
        if score:  # Metz et al. 2019: l(x; w(t)) for t = 1..T, a fresh batch of the split
            term = self.meta_forward(new, k_meta)
        return new, (term, loss, step >= ps.length)

    # -- batches of particles -------------------------------------------------------------------

    def init(self, meta_params: MetaParams, key: jax.Array, *, pairs: bool = False) -> UnrollState:
        """Fresh particles (antithetic partners share their task when ``pairs``) and the reset
        policy's initial state."""
        keys = self.particle_keys(key, pairs)
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

    def particle_keys(self, key: jax.Array, pairs: bool) -> jax.Array:
        fn = keys_lib.pair_keys if pairs else keys_lib.particle_keys
        return fn(keys_lib.salted(key, keys_lib.PARTICLES), self.num_particles, self.shard_axis)

    def begin(self, state: UnrollState, key: jax.Array, outer_step: jax.Array, *,
              pairs: bool = False) -> Truncation:
        """This truncation's length, the particles' keys and the reset policy's draws."""
        n_steps = self.truncation_length(key, outer_step)
        keys = self.particle_keys(key, pairs)
        restore, restored = self.reset.draw(state.reset_state, keys, outer_step)
        push_at = self.reset.push_index(keys, n_steps)
        return Truncation(n_steps, SegmentStart(keys, restore, restored, push_at))

    def run(
        self,
        meta_params: MetaParams,
        particles: ParticleState,
        trunc: Truncation,
        outer_step: jax.Array,
        *,
        per_particle_meta_params: bool = False,
        checkpoint: bool = False,
        stop_inner_grad: bool = False,
        vmapped: bool = False,
    ) -> tuple[ParticleState, Any, tuple, ResetInfo, dict]:
        """The inner steps of one truncation for the particles of ``trunc`` (differentiable in
        ``meta_params``). Returns (final states, offered states or None, per-step outputs
        (terms, losses, done, reset, mask, unnormalized) padded to ``trunc_length``, reset
        info, the inner-update wrapper's metrics of the final states).

        ``vmapped``: the caller maps this call over an axis of its own (``merged``'s antithetic
        pairs). The restart of ended trajectories (the select of fresh states, and the extra
        forward that scores an ending trajectory's last update) then runs at every step instead
        of under a ``lax.cond`` on any trajectory ending: mapped over that axis the cond's predicate
        is batched, which turns the cond into a select of both branches anyway, and JAX's
        batching of such a cond inside ``shard_map`` fails (it re-marks the already varying
        data arrays as varying over the particle axis)."""
        policy = self.reset
        offer = trunc.start.push_at is not None
        n_steps = trunc.n_steps
        shift = self.scores_next_batch
        theta_axis = 0 if per_particle_meta_params else None
        raw = self.meta_loss.normalize == "initial"

        def go(bucket: int):
            fresh_count = self.fresh_per_truncation(bucket)
            # Without a truncation schedule n_steps is trunc_length, the one bucket: every step
            # of the scan runs, and selecting the stepped state by `ran` would copy it for nothing.
            every_step_runs = self.trunc_schedule is None and bucket == self.trunc_length

            def prepare(theta, ps, start, restored):
                """One particle's fresh trajectories for this truncation and its start."""
                k_fresh, k_steps = jax.random.split(start.keys)
                fresh = jax.vmap(lambda k: self.fresh_particle(theta, k, outer_step))(
                    jax.random.split(keys_lib.salted(k_fresh, keys_lib.FRESH), fresh_count)
                )
                ended = ps.step >= ps.length
                new_start = ended | policy.segment_reset  # start a fresh trajectory
                first = jax.tree.map(lambda x: x[0], fresh)
                begin = tree_where(new_start, first, ps)
                if restored is not None:
                    begin = tree_where(start.restore, restored, begin)
                carried = ~start.restore & ~new_start
                used = jnp.where(~start.restore & new_start, 1, 0).astype(jnp.int32)
                info = ResetInfo(carried, start.restore, begin.step)
                return fresh, begin, used, info, jax.vmap(step_keys)(jax.random.split(k_steps, bucket))

            def run_bucket(theta, particles, start, restored):
                fresh, begin, used, info, keys = jax.vmap(
                    prepare, in_axes=(theta_axis, 0, 0, 0))(theta, particles, start, restored)
                # The barrier keeps fresh states XLA can fold to constants (zero momenta) as
                # one buffer: folded, they are sunk into the loop and re-broadcast at every step
                # as the restart cond's operand (256 particles: 4% of W1's kernel time).
                fresh = jax.lax.optimization_barrier(self.vary(fresh))
                step = jax.vmap(
                    lambda th, ps, k: self.inner_step(
                        th, ps, k, outer_step, stop_inner_grad=stop_inner_grad, score=not shift),
                    in_axes=(theta_axis, 0, 0),
                )
                forward = jax.vmap(self.meta_forward)

                def body(carry, xs):
                    cur, used, offered = carry
                    k, t = xs  # k: [P, 4, 2] (step_keys)
                    ran = t < n_steps
                    need = (cur.step >= cur.length) & ran  # mid-truncation end: continue fresh
                    k_end = k[:, 3]

                    def restart():
                        """(the term of an ending trajectory's last update, or None without
                        ``shift``; the particles with the ended ones replaced by fresh ones)."""
                        nxt = jax.vmap(lambda f, u: jax.tree.map(
                            lambda x: x[jnp.minimum(u, fresh_count - 1)], f))(fresh, used)
                        return (forward(cur, k_end) if shift else None,
                                _where_particles(need, nxt, cur))

                    if vmapped:
                        ended, cur = restart()
                    else:  # most steps end no trajectory: skip the forward and the state select
                        def keep():
                            if not shift:
                                return None, cur
                            shape = jax.eval_shape(forward, cur, k_end)
                            return self.vary(jnp.zeros(shape.shape, shape.dtype)), cur

                        ended, cur = jax.lax.cond(jnp.any(need), restart, keep)
                    used = used + need.astype(jnp.int32)
                    new, (term, loss, done) = step(theta, cur, k)
                    if every_step_runs:  # (leaves the update left invariant, e.g. a clock's)
                        new = self.vary(new)
                    else:  # a shorter truncation in a longer bucket
                        new = _where_particles(ran, new, cur)
                    if offer:
                        offered = _where_particles(t == start.push_at, new, offered)
                    reset = need | ((t == 0) & ~info.carried)
                    unnormalized = (cur.init_loss <= NORMALIZER_FLOOR) & ran & raw
                    if shift:  # this step's training loss scores the previous update
                        term = jnp.where(need, ended, jax.vmap(self.score)(cur, loss))
                    ys = (term, loss, done & ran, reset & ran, jnp.broadcast_to(ran, need.shape),
                          unnormalized)
                    return (new, used, offered), ys

                scan = checkpointed_scan if checkpoint else _plain_scan
                carry = self.vary((begin, used, begin if offer else None))
                xs = (jnp.swapaxes(keys, 0, 1), jnp.arange(bucket))
                (end, _, offered), ys = scan(body, carry, xs, bucket)
                ys = tuple(jnp.swapaxes(y, 0, 1) for y in ys)  # [B, P] -> [P, B]
                if shift:  # terms[t] was measured at step t + 1; the last one after the scan
                    last = forward(end, keys[:, -1, 3])
                    ys = (jnp.concatenate([ys[0][:, 1:], last[:, None]], axis=1), *ys[1:])
                pad = self.trunc_length - bucket
                ys = tuple(jnp.pad(y, ((0, 0), (0, pad))) for y in ys)
                return end, offered, ys, info, self.update_metrics(end)

            return run_bucket

        start = trunc.start._replace(restored=None)
        args = (meta_params, particles, start, trunc.start.restored)
        buckets = self.buckets
        if len(buckets) == 1:
            return go(buckets[0])(*args)
        index = jnp.searchsorted(jnp.asarray(buckets), n_steps)
        return jax.lax.switch(index, [go(b) for b in buckets], *args)

    def update_metrics(self, particles: ParticleState) -> dict[str, jax.Array]:
        """The inner-update wrapper's metrics (its ``metrics(opt_state)``), averaged over the
        particles; {} for a plain learned optimizer."""
        fn = getattr(self.learned_opt, "metrics", None)
        if fn is None:
            return {}
        return {k: jnp.mean(v) for k, v in jax.vmap(fn)(particles.opt_state).items()}

    def finish(self, state: UnrollState, particles: ParticleState, offered: Any, *,
               pairs: bool = False) -> UnrollState:
        """The new unroll state: the final particles, and the reset policy's state after it
        observed the offered states (a state at its trajectory's end is not offered; antithetic
        partners offer once, the positive member)."""
        reset_state = state.reset_state
        if offered is not None:
            valid = offered.step < offered.length
            if pairs:
                valid = valid & (jnp.arange(valid.shape[0]) % 2 == 0)
            reset_state = self.reset.observe(reset_state, offered, valid, self.shard_axis, self.num_shards)
        return UnrollState(particles, reset_state)

    def unroll(
        self,
        meta_params: MetaParams,
        state: UnrollState,
        key: jax.Array,
        outer_step: jax.Array,
        *,
        pairs: bool = False,
        per_particle_meta_params: bool = False,
        checkpoint: bool = False,
        stop_inner_grad: bool = False,
    ) -> tuple[UnrollState, UnrollOutput]:
        """Advance every particle by one truncation (``begin``, ``run``, ``finish``).

        Args:
          meta_params: shared meta-params, or with a leading particle axis when
            ``per_particle_meta_params`` (ES-type estimators' perturbed copies).
          state: the particles (leading axis P) and the reset policy's state.
          key: this outer step's key; particles' keys derive from it by global index.
          outer_step: the run's clock.
          pairs: antithetic partners 2i, 2i + 1 share keys (task, batches, resets, draws).
          checkpoint: recompute inner steps in the backward pass (``checkpointed_scan``).
          stop_inner_grad: first-order meta-gradients (see ``inner_step``).
        """
        trunc = self.begin(state, key, outer_step, pairs=pairs)
        end, offered, ys, info, extras = self.run(
            meta_params, state.particles, trunc, outer_step,
            per_particle_meta_params=per_particle_meta_params,
            checkpoint=checkpoint, stop_inner_grad=stop_inner_grad,
        )
        new = self.finish(state, end, offered, pairs=pairs)
        return new, UnrollOutput(*ys, info=info, position=end.step, extras=extras)

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
        """Run fresh trajectories of ``length`` steps (<= ``max_length``, a shape) without resets
        (full-trajectory estimators); returns the final states and per-step outputs, masked
        past ``length``."""
        def one_particle(theta, key):
            k_init, k_steps = jax.random.split(key)
            ps = self.vary(self.fresh_particle(theta, k_init, outer_step)._replace(length=length))

            def body(carry, xs):
                k, t = xs
                new, (term, loss, done) = self.inner_step(theta, carry, k, outer_step)
                ran = t < length
                raw = self.meta_loss.normalize == "initial"
                unnormalized = (carry.init_loss <= NORMALIZER_FLOOR) & ran & raw
                return tree_where(ran, new, carry), (term, loss, done & ran, jnp.zeros_like(ran), ran, unnormalized)

            xs = (jax.random.split(k_steps, max_length), jnp.arange(max_length))
            return jax.lax.scan(body, ps, xs)

        in_axes = (0 if per_particle_meta_params else None, 0)
        final, ys = jax.vmap(one_particle, in_axes=in_axes)(meta_params, keys)
        n = keys.shape[0]
        info = ResetInfo(jnp.zeros(n, bool), jnp.zeros(n, bool), jnp.zeros(n, jnp.int32))
        return final, UnrollOutput(*ys, info=info, position=final.step, extras=self.update_metrics(final))


def unroll_metrics(unroller: Unroller, out: UnrollOutput, *, pairs: bool = False) -> dict[str, jax.Array]:
    """Metrics every estimator reports about its unroll (means over this device's particles;
    the trainer combines devices: counts summed, ``position_max`` maxed, the rest averaged).

    ``inner_loss``: mean training-batch loss over the steps that ran; ``inner_steps``: steps
    run (all particles); ``trajectories_done``: trajectories that ended (per pair when ``pairs``);
    ``position_mean``/``position_max``: the inner step the particles reached at the end of the
    truncation (the effective unroll length); ``restored_share``: particles that started from a
    stored state; ``clipped_share``: meta-loss terms at the clip or non-finite (no gradient);
    ``nonfinite_share``: training losses that are NaN/inf (a diverged inner run);
    ``unnormalized_share``: with ``normalize="initial"``, terms left unnormalised because the
    trajectory's initial loss was ~0."""
    done = out.done[0::2] if pairs else out.done
    ran = out.mask.astype(jnp.float32)
    n_ran = jnp.maximum(ran.sum(), 1.0)
    share = lambda flags: (flags.astype(jnp.float32) * ran).sum() / n_ran  # noqa: E731
    return {
        "inner_loss": out.step_mean(out.raw_losses).mean(),
        "inner_steps": out.mask.sum(),
        "trajectories_done": done.sum(),
        "position_mean": out.position.astype(jnp.float32).mean(),
        "position_max": out.position.max().astype(jnp.float32),
        "restored_share": out.info.restored.astype(jnp.float32).mean(),
        "clipped_share": share(unroller.meta_loss.at_bound(out.losses)),
        "nonfinite_share": share(~jnp.isfinite(out.raw_losses)),
        "unnormalized_share": share(out.unnormalized),
        **out.extras,
    }
