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
the updates given by the current learned optimizer phi as dtheta^phi_t = phi(g_t)". Here an
imitation episode trains fresh task instances with the teacher for T = N_train steps (the
trajectory length: ``episode_length``), feeds the learned optimizer the teacher trajectory's
gradients and params (its own state advancing along that trajectory: off-policy), and
differentiates L_O by autodiff; otherwise the wrapped estimator takes its normal meta-loss step.
One ``lax.switch`` inside the one compiled outer step chooses; r lives in the state, so the host
sets it per curriculum stage (:meth:`Imitation.at_stage`) without recompiling.

Our choices where the paper is silent: w_t = 1/T (``weights="uniform"``; ``"linear"`` weighs
later steps more); the squared error is summed over all coordinates and, with
``normalize="teacher"``, divided by sum_t w_t ||dtheta^O_t||^2 (scale-free across teachers and
tasks; ``"none"`` keeps the paper's raw weighted sum).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from estimators.base import Estimator, at_stage as _at_stage, per_device
from estimators import keys as keys_lib
from estimators.unroll import Unroller, checkpointed_scan
from lopt import teachers as teachers_lib
from lopt.base import MetaParams
from lopt.wrappers import sq_norm, unwrap


class ImitationState(NamedTuple):
    base: Any  # the wrapped estimator's state
    prob: jax.Array  # float32 scalar r: probability that an outer step is an imitation episode


@dataclasses.dataclass(frozen=True)
class Imitation:
    """Wraps ``base``: with probability r an outer step is a Chen et al. 2020 Alg. 2 imitation
    episode (module docstring).

    prob: r, a float, or one r per curriculum stage (the last value repeats for later stages);
      the training loop sets stage s's value when the stage starts (:meth:`at_stage`).
    teachers: drawn uniformly per episode (default Adam, SGD and Adagrad, Chen et al. Sec. 5.3;
      names or dicts, see ``lopt.teachers.spec``).
    length: episode length T (a shape); default N_train, the horizon's length.
    normalize, weights: module docstring. checkpoint: backprop with O(sqrt(T)) memory.

    In an imitation step the base estimator's state is untouched (its particles wait) and its
    metrics read 0; ``imitation`` (1 or 0) and ``imitation_loss`` tell the two kinds apart.
    """

    base: Estimator
    prob: float | tuple[float, ...] = 0.5
    teachers: Any = teachers_lib.CHEN_TEACHERS
    length: int | None = None
    normalize: str = "teacher"
    weights: str = "uniform"
    checkpoint: bool = True

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
            raise ValueError(f"imitation.normalize must be 'teacher' or 'none', got {self.normalize!r}")
        if self.weights not in ("uniform", "linear"):
            raise ValueError(f"imitation.weights must be 'uniform' or 'linear', got {self.weights!r}")

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

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> ImitationState:
        r = jnp.asarray(self.prob_at(0), jnp.float32)
        return ImitationState(self.base.init(unroller, key, meta_params), r)

    def partition(self, state: ImitationState) -> ImitationState:
        return ImitationState(self.base.partition(state.base), False)

    def at_stage(self, state: ImitationState, stage: int) -> ImitationState:
        """The state with stage ``stage``'s r (host side; the compiled step is reused, r being
        data), and the base estimator's own per-stage state."""
        r = jnp.asarray(self.prob_at(stage), jnp.float32)
        sharding = getattr(state.prob, "sharding", None)
        r = r if sharding is None else jax.device_put(r, sharding)
        return ImitationState(_at_stage(self.base, state.base, stage), r)

    # -- the imitation loss -------------------------------------------------------------------

    def episode_loss(
        self, unroller: Unroller, meta_params: MetaParams, key: jax.Array, teacher: Any
    ) -> jax.Array:
        """L_O of one task instance (eq. 1): the teacher trains it for T steps from a fresh
        init; at each step the learned optimizer (its state advanced along the teacher's
        trajectory) proposes an update for the same gradient and params."""
        task = unroller.task_family
        teacher_opt = teachers_lib.build(teacher)
        opt = unwrap(unroller.learned_opt).optimizer(meta_params)
        length = self.episode_length(unroller)
        k_init, k_steps = jax.random.split(key)
        spec = task.sample(jax.random.fold_in(k_init, 0))
        params = jax.lax.stop_gradient(task.init(spec, jax.random.fold_in(k_init, 1)))
        carry = unroller.vary((params, opt.init(params), teacher_opt.init(params)))

        def body(carry, k):
            params, lo_state, t_state = carry
            batch = task.batch(spec, k, "train")
            (loss, _), grads = jax.value_and_grad(task.loss, argnums=1, has_aux=True)(spec, params, batch)
            t_updates, t_state = teacher_opt.update(grads, t_state, params)
            lo_updates, lo_state = opt.update(grads, lo_state, params, loss=loss)
            t_updates = jax.lax.stop_gradient(t_updates)
            d = sq_norm(jax.tree.map(lambda a, b: jnp.asarray(a, jnp.float32) - b, lo_updates, t_updates))
            params = jax.lax.stop_gradient(optax.apply_updates(params, t_updates))
            return (params, lo_state, t_state), (d, sq_norm(t_updates))

        keys = jax.random.split(k_steps, length)
        if self.checkpoint:
            _, (d, n) = checkpointed_scan(body, carry, keys, length)
        else:
            _, (d, n) = jax.lax.scan(body, carry, keys)
        w = jnp.ones(length) if self.weights == "uniform" else jnp.arange(1, length + 1, dtype=jnp.float32)
        w = w / w.sum()
        loss = jnp.sum(w * d)
        if self.normalize == "teacher":
            loss = loss / jnp.maximum(jnp.sum(w * n), 1e-30)
        return loss

    def imitation_grad(
        self, unroller: Unroller, meta_params: MetaParams, key: jax.Array, teacher_index: jax.Array
    ) -> tuple[jax.Array, MetaParams]:
        """(mean L_O over this device's particles, its gradient) with the teacher
        ``teacher_index`` (a traced scalar: one ``lax.switch`` over the teachers)."""
        keys = keys_lib.particle_keys(key, unroller.num_particles, unroller.shard_axis)

        def loss_fn(theta):
            def run(spec):
                return lambda th: jax.vmap(lambda k: self.episode_loss(unroller, th, k, spec))(keys).mean()

            return jax.lax.switch(teacher_index, [run(s) for s in self.teachers], theta)

        return jax.value_and_grad(loss_fn)(per_device(unroller, meta_params))

    # -- the estimator ---------------------------------------------------------------------------

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: ImitationState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, ImitationState, dict]:
        k_coin, k_teacher, k_episode, k_base = jax.random.split(key, 4)
        is_imitation = jax.random.uniform(k_coin) < state.prob
        teacher = jax.random.randint(k_teacher, (), 0, len(self.teachers))
        length = self.episode_length(unroller)

        traced = {}  # the normal branch's metric shapes, recorded when it is traced

        def normal(_):
            grad, base, metrics = self.base.grad(unroller, meta_params, state.base, k_base, outer_step)
            metrics = {**metrics, "imitation": jnp.zeros([], jnp.float32),
                       "imitation_loss": jnp.zeros([], jnp.float32)}
            grad, metrics = unroller.vary((grad, metrics))  # both branches: per-device values
            traced["metrics"] = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in metrics.items()}
            return grad, base, metrics

        def imitate(_):
            if "metrics" not in traced:  # lax.switch traces branches in order; just in case
                jax.eval_shape(normal, None)
            shapes = traced["metrics"]
            loss, grad = self.imitation_grad(unroller, meta_params, k_episode, teacher)
            metrics = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
            metrics.update(
                imitation=jnp.ones([], jnp.float32),
                imitation_loss=loss.astype(jnp.float32),
            )
            if "inner_steps" in shapes:
                metrics["inner_steps"] = jnp.asarray(
                    unroller.num_particles * length, shapes["inner_steps"].dtype)
            grad, metrics = unroller.vary((grad, metrics))
            return grad, state.base, metrics

        branch = is_imitation.astype(jnp.int32)  # 0: meta-loss step, 1: imitation episode
        grad, base, metrics = jax.lax.switch(branch, [normal, imitate], None)
        metrics["imitation_teacher"] = jnp.where(is_imitation, teacher, -1).astype(jnp.float32)
        return grad, ImitationState(base, state.prob), metrics


__all__ = ["Imitation", "ImitationState"]
