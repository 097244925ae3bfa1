"""Inner-update wrappers of a learned optimizer: ELO behaviour cloning and self-improving mixing.

The unroll drives inner training with ONE inner-update factory, ``meta_params ->
optax.GradientTransformationExtraArgs`` (DESIGN.md): a learned optimizer, or one of the
wrappers below around it. Each wrapper is itself a learned-optimizer-like object
(``init(key)`` gives the wrapped optimizer's meta-params, ``optimizer(meta_params)`` an optax
transformation), and keeps its inner optimizer's state inside its own (the shape of optax's
``apply_if_finite``). Wrapping is exclusive by structure: the unroll has one slot, and a wrapper
takes a plain learned optimizer (``unwrap`` reaches it).

The unroll passes two extra arguments to every ``update``: ``outer_step``, the run's clock
(``MetaTrainState.outer_step``: schedules over meta-training read it), and ``key`` (a per-step
key for the wrapper's own draws). Plain learned optimizers ignore both.

A wrapper that adds a term to the meta-loss defines ``meta_term(opt_state, task_term)``; the
unroll calls it with the state after the update (:func:`meta_term`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt import teachers as teachers_lib
from lopt.base import LearnedOptimizer, MetaParams, build_optimizer
from tasks.registry import ConfigError

# --- alpha ramps over the run's outer steps, built from optax schedules ---------------------------

RAMP_KINDS = ("linear", "cosine", "step", "constant")


@dataclasses.dataclass(frozen=True)
class Ramp:
    """A value in [0, 1] against the outer step: 0 before ``start``, rising to 1 over ``steps``
    (static and hashable; calls an optax schedule).

    kind: ``linear`` f (``optax.linear_schedule``); ``cosine`` (1 - cos(pi f)) / 2 (one minus
      ``optax.cosine_decay_schedule``); ``step`` floor(levels f) / levels (``levels`` = 1: one
      jump from 0 to 1 at ``start + steps``; ``optax.join_schedules`` of constants);
      ``constant`` ``value``. Here f = clip((outer_step - start) / steps, 0, 1).
    """

    kind: str = "linear"
    steps: int = 1000
    start: int = 0
    levels: int = 1
    value: float = 1.0

    def __post_init__(self):
        if self.kind not in RAMP_KINDS:
            raise ValueError(f"schedule kind must be one of {RAMP_KINDS}, got {self.kind!r}")
        if int(self.steps) < 1 or int(self.levels) < 1 or int(self.start) < 0:
            raise ValueError(f"schedule: need steps >= 1, levels >= 1, start >= 0; got {self}")
        if not 0.0 <= float(self.value) <= 1.0:
            raise ValueError(f"schedule: constant value must lie in [0, 1], got {self.value}")

    def schedule(self) -> optax.Schedule:
        start, steps = int(self.start), int(self.steps)
        if self.kind == "constant":
            return optax.constant_schedule(float(self.value))
        if self.kind == "linear":
            return optax.linear_schedule(0.0, 1.0, transition_steps=steps, transition_begin=start)
        if self.kind == "cosine":
            decay = optax.cosine_decay_schedule(1.0, decay_steps=steps)
            return optax.join_schedules(
                [optax.constant_schedule(0.0), lambda t: 1.0 - decay(t)], boundaries=[start]
            )
        levels = int(self.levels)
        values = [optax.constant_schedule(k / levels) for k in range(levels + 1)]
        bounds = [start + math.ceil(k * steps / levels) for k in range(1, levels + 1)]
        return optax.join_schedules(values, boundaries=bounds)

    def __call__(self, outer_step: jax.Array) -> jax.Array:
        return jnp.asarray(self.schedule()(jnp.asarray(outer_step, jnp.int32)), jnp.float32)


def ramp(x: Any) -> Ramp:
    """A :class:`Ramp` from a Ramp, a dict of its fields or a kind name."""
    if isinstance(x, Ramp):
        return x
    if isinstance(x, Mapping):
        return Ramp(**dict(x))
    if isinstance(x, str):
        return Ramp(kind=x)
    raise ConfigError(f"cannot read schedule {x!r}; use {{'kind': 'linear', 'steps': 1000}}")


# --- helpers ---------------------------------------------------------------------------------------


def unwrap(learned_opt: Any) -> LearnedOptimizer:
    """The plain learned optimizer inside any wrapper (itself if it is one)."""
    while hasattr(learned_opt, "learned_opt"):
        learned_opt = learned_opt.learned_opt
    return learned_opt


def meta_term(inner_update: Any, opt_state: Any, task_term: jax.Array) -> jax.Array:
    """The meta-loss term of one inner step: the wrapper's ``meta_term`` if it has one, else
    the task term."""
    fn = getattr(inner_update, "meta_term", None)
    return task_term if fn is None else fn(opt_state, task_term)


def _f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def sq_norm(tree: Any) -> jax.Array:
    """sum of squares of every leaf, in float32."""
    return sum((jnp.sum(jnp.square(x)) for x in jax.tree.leaves(_f32(tree))), jnp.zeros([], jnp.float32))


def _check_plain(learned_opt: Any, what: str) -> None:
    if hasattr(learned_opt, "learned_opt"):
        raise ConfigError(f"{what} wraps a learned optimizer, not another wrapper; enable one of "
                          "behaviour cloning and self-improving")


# --- ELO behaviour cloning --------------------------------------------------------------------------


class BehaviourCloningState(NamedTuple):
    inner: Any  # the learned optimizer's state, advanced with every step's gradient
    teacher: Any  # the teacher's (Adam's) state, likewise
    bc_loss: jax.Array  # float32: L_bc of the last update
    alpha: jax.Array  # float32: a_t of the last update


@dataclasses.dataclass(frozen=True)
class BehaviourCloning:
    """ELO's online behaviour cloning (ELO, Algorithm 1, the yellow lines):

        10: theta^H_{n+1} = theta_n + dtheta^H_n              (Adam update)
        11: theta^O_{n+1} = theta_n + dtheta^O_n              (LO update)
        12: theta_{n+1} = (1 - a_t) theta^H_{n+1} + a_t theta^O_{n+1}   (fused trajectory)
        13: L^meta_n = (1 - a_t) L^bc_n + a_t L^task_n        (fused meta-loss)

    Both updates are computed from theta_n, so the fused step is theta_n + (1 - a_t) u_T +
    a_t u_LO; the teacher's and the learned optimizer's states both advance with every step's
    gradient. The fused trajectory is differentiated as it is: u_T = u_T(theta_n) depends on the
    meta-params through theta_n (line 10), so a second-order estimator (TBPTT with
    ``first_order=False``, merged's reparameterization half) carries d theta_{n+1} / d phi through
    the teacher's step as well as the learned optimizer's. Only L_bc's target is a label
    (``stop_gradient``): line 13 fits the learned optimizer to the teacher, not the teacher to
    the learned optimizer. "a_t: mixing coefficient (increases 0 -> 1)" over the outer steps t (``schedule``,
    a :class:`Ramp` read at the run's ``outer_step``); at a_t = 0 and 1 the update is exactly
    the teacher's and the learned optimizer's.

    L^bc (the paper does not define it): L_bc = log(1 + ||u_LO - u_T||^2 / ||u_T||^2), with the
    teacher's update u_T a label (``stop_gradient`` in L_bc only). It is 0 when the learned
    optimizer agrees with the teacher, equals the relative squared error ||u_LO - u_T||^2 /
    ||u_T||^2 to first order, does not depend on the gradient's scale, and keeps a gradient
    however far apart the two updates are: its derivative in the ratio r = ||u_LO|| / ||u_T|| decays like 2 / r, where
    a clipped squared error had none once r > 1 + sqrt(2) (the clip at 2). It is not clipped.

    teacher: the teacher (default Adam, lr 1e-3), as ``lopt.teachers.spec`` reads it.
    """

    learned_opt: LearnedOptimizer
    teacher: Any = "adam"
    schedule: Any = Ramp("linear", 1000)

    def __post_init__(self):
        _check_plain(self.learned_opt, "behaviour cloning")
        object.__setattr__(self, "teacher", teachers_lib.spec(self.teacher))
        object.__setattr__(self, "schedule", ramp(self.schedule))

    @property
    def name(self) -> str:
        return self.learned_opt.name

    def init(self, key: jax.Array) -> MetaParams:
        return self.learned_opt.init(key)

    def alpha(self, outer_step: jax.Array) -> jax.Array:
        return self.schedule(outer_step)

    def optimizer(self, meta_params: MetaParams, num_steps=None) -> optax.GradientTransformationExtraArgs:
        lo = build_optimizer(self.learned_opt, meta_params, num_steps)
        teacher = teachers_lib.build(self.teacher)

        def init_fn(params):
            zero = jnp.zeros([], jnp.float32)
            return BehaviourCloningState(lo.init(params), teacher.init(params), zero, zero)

        def update_fn(grads, state, params=None, *, outer_step, **extra):
            u_lo, inner = lo.update(grads, state.inner, params, outer_step=outer_step, **extra)
            u_t, teacher_state = teacher.update(grads, state.teacher, params)
            alpha = self.alpha(outer_step)
            fused = jax.tree.map(
                lambda t, l: jnp.where(
                    alpha <= 0.0, t, jnp.where(alpha >= 1.0, l, (1.0 - alpha) * t + alpha * l)
                ).astype(jnp.result_type(l)),
                u_t,
                u_lo,
            )
            label = jax.lax.stop_gradient(u_t)  # L_bc's target: the teacher's update, a label
            ratio = sq_norm(jax.tree.map(lambda l, t: l - t, _f32(u_lo), _f32(label))) / jnp.maximum(
                sq_norm(label), 1e-30
            )
            return fused, BehaviourCloningState(inner, teacher_state, jnp.log1p(ratio), alpha)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    @staticmethod
    def metrics(opt_state: BehaviourCloningState) -> dict[str, jax.Array]:
        """``bc_alpha`` (a_t, read at the run's clock) and ``bc_loss`` of the last update."""
        return {"bc_alpha": opt_state.alpha, "bc_loss": opt_state.bc_loss}

    @staticmethod
    def meta_term(opt_state: BehaviourCloningState, task_term: jax.Array) -> jax.Array:
        """(1 - a_t) L_bc + a_t L_task (Alg. 1 line 13), exactly L_bc at a_t = 0 and exactly
        L_task at a_t = 1."""
        a, bc = opt_state.alpha, opt_state.bc_loss
        return jnp.where(a <= 0.0, bc, jnp.where(a >= 1.0, task_term, (1.0 - a) * bc + a * task_term))


# --- self-improving mixing ----------------------------------------------------------------------


class SelfImprovingState(NamedTuple):
    inner: Any  # the learned optimizer's state
    teachers: tuple  # each teacher's state, advanced at every step
    choice: jax.Array  # int32: whose update the last step took (0 learned, 1.. teachers)


@dataclasses.dataclass(frozen=True)
class SelfImproving:
    """Self-improving mixing, the baseline Chen et al. 2020 compare imitation with (Sec. 4.2):
    "sampling and mixing different optimizers in one training pass (i.e., each iteration may
    adopt a different optimizer's update), according to a probability distribution. Then, the
    probability of choosing other optimizers will be gradually annealed". At every inner step
    the update of one optimizer drawn from {learned, teachers...} is taken: the learned one
    with probability p_t = p0 + (1 - p0) schedule(outer_step) (p0 = ``initial_prob``, default
    1 / (1 + #teachers): "p0 = p1 = ... = pk = 1/(k+1)" at the beginning), each teacher with
    (1 - p_t) / k. Every state advances at every step with the step's gradient, so a teacher
    drawn later continues from the trajectory actually taken. The meta-loss is unchanged ("the
    loss for training L2O is still L_f(phi)").
    """

    learned_opt: LearnedOptimizer
    teachers: Any = teachers_lib.CHEN_TEACHERS
    schedule: Any = Ramp("linear", 1000)
    initial_prob: float | None = None

    def __post_init__(self):
        _check_plain(self.learned_opt, "self-improving mixing")
        object.__setattr__(self, "teachers", teachers_lib.specs(self.teachers))
        object.__setattr__(self, "schedule", ramp(self.schedule))
        if self.initial_prob is not None and not 0.0 <= float(self.initial_prob) <= 1.0:
            raise ConfigError(f"self_improving.initial_prob must lie in [0, 1], got {self.initial_prob}")

    @property
    def name(self) -> str:
        return self.learned_opt.name

    def init(self, key: jax.Array) -> MetaParams:
        return self.learned_opt.init(key)

    def learned_prob(self, outer_step: jax.Array) -> jax.Array:
        p0 = 1.0 / (1 + len(self.teachers)) if self.initial_prob is None else float(self.initial_prob)
        return p0 + (1.0 - p0) * self.schedule(outer_step)

    def probs(self, outer_step: jax.Array) -> jax.Array:
        """[1 + #teachers] probabilities, the learned optimizer's first."""
        p = self.learned_prob(outer_step)
        k = len(self.teachers)
        return jnp.concatenate([p[None], jnp.full((k,), (1.0 - p) / k)])

    def choose(self, key: jax.Array, outer_step: jax.Array) -> jax.Array:
        """Index of the optimizer whose update is taken: 0 learned, 1.. teachers."""
        p = self.learned_prob(outer_step)
        u = jax.random.uniform(key)
        k = len(self.teachers)
        teacher = jnp.floor((u - p) / jnp.maximum(1.0 - p, 1e-12) * k).astype(jnp.int32)
        return jnp.where(u < p, 0, 1 + jnp.clip(teacher, 0, k - 1)).astype(jnp.int32)

    @staticmethod
    def metrics(opt_state: SelfImprovingState) -> dict[str, jax.Array]:
        """``learned_share``: 1 where the last step took the learned optimizer's update."""
        return {"learned_share": (opt_state.choice == 0).astype(jnp.float32)}

    def optimizer(self, meta_params: MetaParams, num_steps=None) -> optax.GradientTransformationExtraArgs:
        lo = build_optimizer(self.learned_opt, meta_params, num_steps)
        teachers = [teachers_lib.build(s) for s in self.teachers]

        def init_fn(params):
            return SelfImprovingState(
                lo.init(params), tuple(t.init(params) for t in teachers), jnp.zeros([], jnp.int32)
            )

        def update_fn(grads, state, params=None, *, outer_step, key, **extra):
            updates, inner = lo.update(grads, state.inner, params, outer_step=outer_step, key=key, **extra)
            choice = self.choose(key, outer_step)
            new_states = []
            for i, (teacher, st) in enumerate(zip(teachers, state.teachers)):
                t_updates, st = teacher.update(grads, st, params)
                new_states.append(st)
                updates = jax.tree.map(
                    lambda t, u: jnp.where(choice == i + 1, t.astype(u.dtype), u), t_updates, updates
                )
            return updates, SelfImprovingState(inner, tuple(new_states), choice)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "BehaviourCloning",
    "BehaviourCloningState",
    "RAMP_KINDS",
    "Ramp",
    "SelfImproving",
    "SelfImprovingState",
    "meta_term",
    "ramp",
    "sq_norm",
    "unwrap",
]
