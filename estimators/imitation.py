"""``Imitation``: Chen et al. 2020's off-policy imitation of analytical optimizers, as an
estimator wrapper.

T. Chen, W. Zhang, J. Zhou, S. Chang, S. Liu, L. Amini, Z. Wang, "Training Stronger Baselines
for Learning to Optimize", NeurIPS 2020, Sec. 4.1 and Algorithm 2:

    for t = 1, 2, ..., T_total do
      Sample a number from uniform distribution u ~ U(0, 1);
      if u < r then
        Select an optimizer O from (O_i) with equal probabilities;
        Generate an optimization trajectory T = [(g_1, dtheta^O_1), ..., (g_Ntrain, dtheta^O_Ntrain)];
        Update phi with respect to L_O(phi) = sum_{t=1}^{Ntrain} w_t (dtheta^O_t - dtheta^phi_t)^2;
      else
        Generate an optimization trajectory by L2O phi;
        Update phi with respect to L_f(phi) = sum_{t=1}^{Ntrain} w_t f(theta_t; phi);

with eq. (1), "the weighted square error between the label updates (dtheta^O_t) given by O and
the updates given by the current learned optimizer phi as dtheta^phi_t = phi(g_t)".

How this implementation reads it, with what Chen et al.'s released code does where the paper is
silent (github.com/VITA-Group/L2O-Training-Techniques, ``L2O-DM & RNNProp``):

* **One coin per trajectory.** Alg. 2's loop runs over trajectories ("Generate an optimization
  trajectory"), and the code flips its coin once per epoch, an epoch being one N_train-step
  trajectory (``train_dm.py``: ``if random.random() < mt_ratio`` at the top of each epoch).
  Here an *epoch* is ``ceil(N_train / trunc_length)`` outer steps (:meth:`Imitation.epoch_steps`,
  the same count the curriculum's periods use), and the coin is flipped at each epoch's first
  outer step: with probability r the whole epoch is an imitation episode, else the wrapped
  estimator takes its meta-loss steps. So imitation's share of trajectories is r at every
  stage, whatever N_train.
* **An episode is truncated, one meta-update per truncation** (the code's ``run_epoch`` over
  ``num_unrolls`` unrolls of ``unroll_length`` steps, an optimizer step after each): at its first
  outer step an episode starts fresh task instances (one per particle) and draws its teacher;
  each outer step of the epoch advances them ``trunc_length`` teacher steps, the learned
  optimizer's state advancing along the teacher's trajectory (off-policy: it sees the teacher's
  gradients and parameters), and takes the gradient of that truncation's L_O. The learned
  optimizer's state carried into a truncation is a constant (as TBPTT; the code assigns it to
  variables between unrolls).
* **eq. (1) as written**: L_O = sum_t w_t ||dtheta^O_t - dtheta^phi_t||^2 over the truncation's
  steps and every coordinate, w_t = 1/T (``weights="uniform"``; ``"linear"`` weighs later
  steps more). The code's loss is 0.5 sum_t mean_coordinates (...)^2: a constant factor, which
  the imitation objective's own Adam state makes irrelevant (next point).
  ``normalize="teacher"`` divides by sum_t w_t ||dtheta^O_t||^2 (our option, scale-free across
  teachers; off by default).
* **Its own meta-optimizer state.** The code minimises each imitation loss with its own
  ``tf.train.AdamOptimizer`` (``meta_dm_train.py``, ``meta_minimize``: one per imitation task,
  beside the meta-loss's). Imitation gradients can be ~1,000x the meta-loss's: one Adam state
  for both would let imitation's second moments shrink every meta-loss step. The estimator
  declares ``objectives = ("meta_loss", "imitation")`` and reports each step's in its metrics
  (``objective``); the trainer keeps one meta-optimizer state per objective.
* **r per curriculum stage** (``prob`` a tuple): the code's ``mt_ratios`` "0.0 0.1 0.3 0.3 ..."
  (stage 0 never imitates). The teachers: the paper's Adam, SGD and Adagrad (Sec. 5.3), drawn
  uniformly per episode; the code's default is Adam alone, at learning rate 0.01
  (``data_generator.py``).

Metrics: an imitation step logs ``imitation`` = 1, ``imitation_loss``, ``imitation_teacher`` and
``inner_steps`` (the teacher steps it ran); the wrapped estimator's metrics are NaN there, and a
meta-loss step's imitation metrics are NaN: the training loop's rows average each metric over
the steps it applies to (``lopt.training.loop.window_row``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from estimators import keys as keys_lib
from estimators.base import Estimator, at_stage as _at_stage, per_device
from estimators.scan import checkpointed_scan, plain_scan
from estimators.unroll import Unroller, tree_where
from lopt import teachers as teachers_lib
from lopt.base import MetaParams
from lopt.wrappers import sq_norm, unwrap

#: An imitation episode's metrics; NaN on meta-loss steps.
IMITATION_METRICS = ("imitation_loss", "imitation_teacher")


class Episode(NamedTuple):
    """The particles' teacher trajectories of the current imitation episode (leading axis P)."""

    spec: Any
    params: Any
    lo_state: Any  # the learned optimizer's state, advanced along the teacher's trajectory
    teacher_states: tuple  # one state per teacher; the episode's teacher's advances


class ImitationState(NamedTuple):
    base: Any  # the wrapped estimator's state
    prob: jax.Array  # float32 r: the probability that an epoch is an imitation episode
    imitating: jax.Array  # bool: the current epoch is an imitation episode
    teacher: jax.Array  # int32: the current episode's teacher
    epoch_step: jax.Array  # int32: outer steps done in the current epoch
    episode: Episode


@dataclasses.dataclass(frozen=True)
class Imitation:
    """Wraps ``base``: with probability r an epoch of the run is a Chen et al. 2020 Alg. 2
    imitation episode (module docstring).

    prob: r, a float, or one r per curriculum stage (the last value repeats for later stages);
      the training loop sets stage s's value when the stage starts (:meth:`at_stage`).
    teachers: drawn uniformly per episode (default Adam, SGD and Adagrad, Chen et al. Sec. 5.3;
      names or dicts, see ``lopt.teachers.spec``).
    length: an episode's trajectory length T; default N_train, the horizon's length.
    normalize, weights: module docstring. checkpoint: backprop with O(sqrt(T)) memory.
    """

    base: Estimator
    prob: float | tuple[float, ...] = 0.5
    teachers: Any = teachers_lib.CHEN_TEACHERS
    length: int | None = None
    normalize: str = "none"
    weights: str = "uniform"
    checkpoint: bool = True

    #: The objectives whose gradients this estimator returns; each gets its own meta-optimizer
    #: state (``metrics["objective"]`` says which a step's gradient belongs to).
    objectives = ("meta_loss", "imitation")

    def __post_init__(self):
        object.__setattr__(self, "teachers", teachers_lib.specs(self.teachers))
        probs = self.prob if isinstance(self.prob, (tuple, list)) else (self.prob,)
        if isinstance(self.prob, (tuple, list)):
            object.__setattr__(self, "prob", tuple(float(p) for p in self.prob))
        if not probs or not all(0.0 <= float(p) <= 1.0 for p in probs):
            raise ValueError(f"imitation.prob must lie in [0, 1] (one value or one per stage), got {self.prob}")
        if self.length is not None and int(self.length) < 1:
            raise ValueError(f"imitation.length must be >= 1, got {self.length}")
        if self.normalize not in ("teacher", "none"):
            raise ValueError(f"imitation.normalize must be 'none' or 'teacher', got {self.normalize!r}")
        if self.weights not in ("uniform", "linear"):
            raise ValueError(f"imitation.weights must be 'uniform' or 'linear', got {self.weights!r}")
        if getattr(self.base, "objectives", ("meta_loss",)) != ("meta_loss",):
            raise ValueError("imitation wraps an estimator of the meta-loss alone, not another wrapper")

    @property
    def per_stage(self) -> bool:
        """Whether ``prob`` gives one r per curriculum stage."""
        return isinstance(self.prob, tuple)

    def prob_at(self, stage: int) -> float:
        """r of curriculum stage ``stage`` (the last value repeats; a float is every stage's)."""
        if not self.per_stage:
            return float(self.prob)
        return self.prob[min(int(stage), len(self.prob) - 1)]

    def episode_length(self, unroller: Unroller) -> int:
        """T of an episode: ``length``, or N_train, the trajectory length (Alg. 2: "Generate an
        optimization trajectory T = [(g_1, dtheta_1), ..., (g_Ntrain, dtheta_Ntrain)]"), i.e.
        the horizon's maximum; a curriculum stage's trainer has the constant horizon N_train of
        its stage, so episodes follow the curriculum."""
        return int(self.length or unroller.horizon.max_length)

    def epoch_steps(self, unroller: Unroller) -> int:
        """Outer steps of an epoch (one trajectory per particle): ceil(T / trunc_length)."""
        return -(-self.episode_length(unroller) // unroller.trunc_length)

    # -- state ----------------------------------------------------------------------------------

    def fresh_episode(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> Episode:
        """New task instances (one per particle, keyed by global index) at their initial
        parameters, with fresh learned-optimizer and teacher states."""
        task = unroller.task_family
        opt = unwrap(unroller.learned_opt).optimizer(meta_params)
        teachers = [teachers_lib.build(t) for t in self.teachers]

        def one(k):
            k_spec, k_init = jax.random.split(k)
            spec = task.sample(k_spec)
            params = task.init(spec, k_init)
            return Episode(spec, params, opt.init(params), tuple(t.init(params) for t in teachers))

        keys = keys_lib.particle_keys(key, unroller.num_particles, unroller.shard_axis)
        return jax.lax.stop_gradient(jax.vmap(one)(keys))

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> ImitationState:
        k_base, k_episode = jax.random.split(key)
        return ImitationState(
            base=self.base.init(unroller, k_base, meta_params),
            prob=jnp.asarray(self.prob_at(0), jnp.float32),
            imitating=jnp.zeros([], bool),
            teacher=jnp.zeros([], jnp.int32),
            epoch_step=jnp.zeros([], jnp.int32),
            episode=self.fresh_episode(unroller, k_episode, meta_params),
        )

    def partition(self, state: ImitationState) -> ImitationState:
        return ImitationState(self.base.partition(state.base), False, False, False, False,
                              jax.tree.map(lambda _: True, state.episode))

    def at_stage(self, state: ImitationState, stage: int) -> ImitationState:
        """The state with stage ``stage``'s r (host side; the compiled step is reused, r being
        data), and the base estimator's own per-stage state."""
        r = jnp.asarray(self.prob_at(stage), jnp.float32)
        sharding = getattr(state.prob, "sharding", None)
        r = r if sharding is None else jax.device_put(r, sharding)
        return state._replace(base=_at_stage(self.base, state.base, stage), prob=r)

    # -- one truncation of an episode -----------------------------------------------------------

    def truncation_loss(
        self, unroller: Unroller, meta_params: MetaParams, episode: Episode, key: jax.Array,
        teacher_index: int, first_step: jax.Array,
    ) -> tuple[jax.Array, tuple[Episode, jax.Array, jax.Array]]:
        """Mean L_O (eq. 1) over this device's particles for the episode's steps ``first_step``
        ... ``first_step + trunc_length - 1`` (those past the episode's length are skipped) with
        teacher ``teacher_index`` (a Python int), and (the advanced episode, sum_t w_t
        ||dtheta^O_t||^2, steps run)."""
        task = unroller.task_family
        teacher = teachers_lib.build(self.teachers[teacher_index])
        opt = unwrap(unroller.learned_opt).optimizer(meta_params)
        trunc, total = unroller.trunc_length, self.episode_length(unroller)
        ran = first_step + jnp.arange(trunc) < total  # [T]
        keys = keys_lib.particle_keys(key, unroller.num_particles, unroller.shard_axis)

        def one(ep: Episode, k: jax.Array):
            def body(carry, xs):
                params, lo_state, t_state = carry
                k_step, run = xs
                batch = task.batch(ep.spec, k_step, "train")
                (loss, _), grads = jax.value_and_grad(task.loss, argnums=1, has_aux=True)(
                    ep.spec, params, batch)
                u_t, t_next = teacher.update(grads, t_state, params)
                u_lo, lo_next = opt.update(grads, lo_state, params, value=loss)
                u_t = jax.lax.stop_gradient(u_t)  # the label: eq. (1)'s dtheta^O_t
                d = sq_norm(jax.tree.map(lambda a, b: jnp.asarray(a, jnp.float32) - b, u_lo, u_t))
                new = (jax.lax.stop_gradient(optax.apply_updates(params, u_t)), lo_next, t_next)
                return tree_where(run, new, carry), (d, sq_norm(u_t))

            t_state = ep.teacher_states[teacher_index]
            carry = unroller.vary((ep.params, jax.lax.stop_gradient(ep.lo_state), t_state))
            xs = (jax.random.split(k, trunc), ran)
            scan = checkpointed_scan if self.checkpoint else plain_scan
            (params, lo_state, t_state), (d, n) = scan(body, carry, xs, trunc)
            states = tuple(t_state if i == teacher_index else s for i, s in enumerate(ep.teacher_states))
            return Episode(ep.spec, params, lo_state, states), d, n

        episode, d, n = jax.vmap(one)(episode, keys)  # d, n: [P, T]
        w = jnp.ones(trunc) if self.weights == "uniform" else jnp.arange(1, trunc + 1, dtype=jnp.float32)
        w = jnp.where(ran, w, 0.0)
        w = w / jnp.maximum(w.sum(), 1.0)
        loss = (d * w).sum(-1)
        teacher_sq = (n * w).sum(-1)
        if self.normalize == "teacher":
            loss = loss / jnp.maximum(jax.lax.stop_gradient(teacher_sq), 1e-30)
        return loss.mean(), (jax.lax.stop_gradient(episode), teacher_sq.mean(), ran.sum())

    def imitation_grad(
        self, unroller: Unroller, meta_params: MetaParams, episode: Episode, key: jax.Array,
        teacher: jax.Array, first_step: jax.Array,
    ) -> tuple[jax.Array, MetaParams, Episode, jax.Array, jax.Array]:
        """(mean L_O, its gradient, the advanced episode, teacher update size, steps run) of one
        truncation, the teacher ``teacher`` a traced index (one ``lax.switch`` over them)."""

        def branch(i):
            def fn(theta, episode):
                grad_fn = jax.value_and_grad(self.truncation_loss, argnums=1, has_aux=True)
                (loss, aux), grad = grad_fn(unroller, theta, episode, key, i, first_step)
                return (loss, grad, *aux)

            return fn

        return jax.lax.switch(teacher, [branch(i) for i in range(len(self.teachers))],
                              per_device(unroller, meta_params), episode)

    # -- the estimator ---------------------------------------------------------------------------

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: ImitationState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, ImitationState, dict]:
        k_coin, k_teacher, k_episode, k_base = jax.random.split(key, 4)
        new_epoch = state.epoch_step == 0
        imitating = jnp.where(new_epoch, jax.random.uniform(k_coin) < state.prob, state.imitating)
        teacher = jnp.where(new_epoch, jax.random.randint(k_teacher, (), 0, len(self.teachers)),
                            state.teacher).astype(jnp.int32)
        nan = jnp.full([], jnp.nan, jnp.float32)
        traced = {}  # the meta-loss branch's metric shapes, recorded when it is traced

        def normal(_):
            grad, base, metrics = self.base.grad(unroller, meta_params, state.base, k_base, outer_step)
            metrics = {**metrics, **{k: nan for k in IMITATION_METRICS}}
            traced["metrics"] = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in metrics.items()}
            return (base, *unroller.vary((grad, state.episode, metrics)))

        def imitate(_):
            if "metrics" not in traced:  # lax.cond traces its branches in order; just in case
                jax.eval_shape(normal, None)
            k_fresh, k_steps = jax.random.split(k_episode)
            fresh = self.fresh_episode(unroller, k_fresh, meta_params)
            episode = tree_where(new_epoch, fresh, state.episode)
            first = state.epoch_step * unroller.trunc_length
            loss, grad, episode, _, n_ran = self.imitation_grad(
                unroller, meta_params, episode, k_steps, teacher, first)
            metrics = {k: jnp.full(v.shape, jnp.nan, v.dtype) if jnp.issubdtype(v.dtype, jnp.floating)
                       else jnp.zeros(v.shape, v.dtype) for k, v in traced["metrics"].items()}
            metrics.update(imitation_loss=loss.astype(jnp.float32),
                           imitation_teacher=teacher.astype(jnp.float32))
            if "inner_steps" in metrics:
                metrics["inner_steps"] = (unroller.num_particles * n_ran).astype(metrics["inner_steps"].dtype)
            return (state.base, *unroller.vary((grad, episode, metrics)))

        base, grad, episode, metrics = jax.lax.cond(imitating, imitate, normal, None)
        metrics["imitation"] = imitating.astype(jnp.float32)
        metrics["objective"] = imitating.astype(jnp.int32)
        new = ImitationState(base, state.prob, imitating, teacher,
                             (state.epoch_step + 1) % self.epoch_steps(unroller), episode)
        return grad, new, metrics


__all__ = ["Episode", "Imitation", "ImitationState"]
