"""Learning from hand-designed teachers: imitation, self-improving mixing, behaviour cloning.

Three ways to use the optax teachers of ``lopt/teachers.py`` while meta-training, each a
separate component that is off unless configured:

* :class:`Imitation` (Chen et al. 2020, "Training stronger baselines for learning to
  optimize", NeurIPS, Algorithm 2). With probability r an outer step is an *imitation
  episode*: a teacher drawn uniformly from the configured ones trains fresh task instances
  for T steps, the learned optimizer is fed the teacher trajectory's gradients (and params),
  and its meta-params take a step on

      L_IL = sum_t w_t || dtheta_teacher_t - dtheta_LO_t ||^2 ,

  differentiated by autodiff; otherwise the wrapped estimator takes a normal meta-loss step.
  It wraps any estimator (one ``lax.cond`` inside the one compiled outer step), and r lives in
  its state, so the host can change it per curriculum stage without recompiling.
* :class:`SelfImproving` (the self-improving baseline of Chen et al. 2020): at every inner
  step the optimizee takes the update of an optimizer drawn from {learned, teachers...}; the
  learned optimizer's probability is annealed to 1 by a :class:`Ramp` over outer steps.
* :class:`BehaviourCloning` (the ELO recipe): the inner trajectory is fused,

      theta_{n+1} = (1 - a_t) theta_Adam + a_t theta_LO = theta_n + (1 - a_t) u_Adam + a_t u_LO,

  both updates computed from theta_n (the Adam state carried in the particle state), and the
  per-step meta-loss term is (1 - a_t) L_bc + a_t L_task, with L_bc the squared distance
  between the two updates normalised by the teacher update's squared norm; a_t follows a
  :class:`Ramp` over outer steps (linear, cosine, step, constant).

Self-improving mixing and behaviour cloning act inside every inner step, so they are options
of the :class:`~estimators.unroll.Unroller` (``self_improving=``, ``behaviour_cloning=``) and
every estimator sees them; the teachers' optimizer states ride in ``ParticleState.aux`` (and
are therefore stored by the replay buffer with the rest of the optimizee state).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from estimators.base import Estimator, particle_keys, per_device
from estimators.unroll import Unroller, checkpointed_scan
from lopt import teachers as teachers_lib
from lopt.base import MetaParams

# Learning rates for teachers named without options (small-problem defaults).
DEFAULT_LEARNING_RATES = {
    "adam": 1e-3,
    "adamw": 1e-3,
    "sgd": 0.1,
    "nesterov": 0.1,
    "adagrad": 0.1,
    "rmsprop": 1e-3,
}
#: Chen et al. 2020's teachers: Sec. 5.3, "off-policy imitation learning (IL) of analytical
#: optimizers (Adam, SGD and Adagrad)"; the same three serve self-improving ("which also take
#: Adam, SGD, and Adagrad as their auxiliary optimizers").
CHEN_TEACHERS = ("adam", "sgd", "adagrad")

TeacherSpec = tuple  # (name, ((option, value), ...)), hashable


def teacher_spec(spec: Any) -> TeacherSpec:
    """Normalise a teacher given as ``"adam"``, ``{"name": "adam", "learning_rate": 3e-4}``
    or ``("adam", {"learning_rate": 3e-4})`` into a hashable ``(name, options)`` pair."""
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping):
        options = dict(spec)
        if "name" not in options:
            raise ValueError(f"teacher {spec!r} needs a 'name'")
        name = options.pop("name")
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        name, options = spec[0], dict(spec[1])
    else:
        raise ValueError(f"cannot read teacher {spec!r}; use a name or {{'name': ..., options}}")
    if name not in teachers_lib.TEACHERS:
        raise ValueError(f"unknown teacher '{name}'; choose from {', '.join(teachers_lib.TEACHERS)}")
    if "learning_rate" not in options and name in DEFAULT_LEARNING_RATES:
        options["learning_rate"] = DEFAULT_LEARNING_RATES[name]
    teachers_lib.get(name, **options)  # fail on bad options now, not inside jit
    return (name, tuple(sorted(options.items())))


def build_teacher(spec: TeacherSpec) -> optax.GradientTransformation:
    name, options = spec
    return teachers_lib.get(name, **dict(options))


def _teacher_specs(specs: Any) -> tuple[TeacherSpec, ...]:
    if isinstance(specs, (str, Mapping)):
        specs = (specs,)
    out = tuple(teacher_spec(s) for s in specs)
    if not out:
        raise ValueError("at least one teacher is needed")
    return out


def _sq_norm(tree: Any) -> jax.Array:
    return sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree.leaves(tree))


def _sq_dist(a: Any, b: Any) -> jax.Array:
    return _sq_norm(jax.tree.map(lambda x, y: jnp.asarray(x, jnp.float32) - y, a, b))


# --- schedules over outer steps ---------------------------------------------------------------

RAMP_KINDS = ("linear", "cosine", "step", "constant")


@dataclasses.dataclass(frozen=True)
class Ramp:
    """A value in [0, 1] against the outer step: 0 before ``start``, rising to 1 over ``steps``.

    kind: ``linear`` f; ``cosine`` (1 - cos(pi f)) / 2; ``step`` floor(levels f) / levels
      (``levels`` = 1: a single jump from 0 to 1 at ``start + steps``); ``constant`` ``value``.
      Here f = clip((outer_step - start) / steps, 0, 1).
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

    def __call__(self, outer_step: jax.Array) -> jax.Array:
        if self.kind == "constant":
            return jnp.asarray(self.value, jnp.float32)
        t = jnp.asarray(outer_step, jnp.float32)
        f = jnp.clip((t - self.start) / self.steps, 0.0, 1.0)
        if self.kind == "linear":
            return f
        if self.kind == "cosine":
            return jnp.where(f >= 1.0, 1.0, 0.5 * (1.0 - jnp.cos(math.pi * f)))
        return jnp.floor(f * self.levels) / self.levels


def _ramp(x: Any) -> Ramp:
    if isinstance(x, Ramp):
        return x
    if isinstance(x, Mapping):
        return Ramp(**dict(x))
    if isinstance(x, str):
        return Ramp(kind=x)
    raise ValueError(f"cannot read schedule {x!r}; use {{'kind': 'linear', 'steps': 1000}}")


# --- ELO behaviour cloning ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BehaviourCloning:
    """ELO behaviour cloning: fused Adam/LO trajectory and fused meta-loss (module docstring).

    teacher: the teacher (default Adam, lr 1e-3), as accepted by :func:`teacher_spec`.
    schedule: a_t as a :class:`Ramp` (or a dict of its fields): 0 is pure teacher, 1 pure LO.
    normalize: ``"teacher"`` divides ||u_LO - u_T||^2 by ||u_T||^2 (scale-free, ~1 for an
      untrained LO); ``"none"`` keeps the raw squared distance. Either is bounded like every
      meta-loss term (``MetaLoss.clip``).
    """

    teacher: Any = "adam"
    schedule: Any = Ramp("linear", 1000)
    normalize: str = "teacher"

    def __post_init__(self):
        object.__setattr__(self, "teacher", teacher_spec(self.teacher))
        object.__setattr__(self, "schedule", _ramp(self.schedule))
        if self.normalize not in ("teacher", "none"):
            raise ValueError(
                f"behaviour_cloning.normalize must be 'teacher' or 'none', got {self.normalize!r}"
            )

    @property
    def teacher_opt(self) -> optax.GradientTransformation:
        return build_teacher(self.teacher)

    def alpha(self, outer_step: jax.Array) -> jax.Array:
        """a_t: the learned optimizer's share of the update and of the meta-loss."""
        return self.schedule(outer_step)

    def init(self, params: Any) -> Any:
        return self.teacher_opt.init(params)

    def fuse(self, grads, params, loss, lo_updates, teacher_state, alpha):
        """(fused update, new teacher state, L_bc) from both optimizers' updates at theta_n.

        The ends are exact: a_t = 0 applies the teacher's update and a_t = 1 the learned
        optimizer's bit for bit (whatever the other update holds)."""
        t_updates, teacher_state = self.teacher_opt.update(grads, teacher_state, params)
        fused = jax.tree.map(
            lambda t, l: jnp.where(
                alpha <= 0.0, t, jnp.where(alpha >= 1.0, l, (1.0 - alpha) * t + alpha * l)
            ).astype(jnp.result_type(l)),
            t_updates,
            lo_updates,
        )
        dist = _sq_dist(lo_updates, t_updates)
        if self.normalize == "teacher":
            dist = dist / jnp.maximum(_sq_norm(t_updates), 1e-30)
        return fused, teacher_state, dist

    @staticmethod
    def fused_term(bc_term: jax.Array, task_term: jax.Array, alpha: jax.Array) -> jax.Array:
        """(1 - a_t) L_bc + a_t L_task, exact at both ends."""
        mix = (1.0 - alpha) * bc_term + alpha * task_term
        return jnp.where(alpha <= 0.0, bc_term, jnp.where(alpha >= 1.0, task_term, mix))


# --- self-improving mixing ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SelfImproving:
    """Per inner step, take the update of one optimizer drawn from {learned, teachers...}.

    The learned optimizer's probability is p_t = p0 + (1 - p0) * schedule(outer_step) (p0 =
    ``initial_prob``, default 1 / (1 + #teachers): uniform over all), the teachers share 1 - p_t
    equally. Every teacher's state is advanced at every step with the step's gradient, so a
    teacher drawn later continues from the trajectory actually taken.
    """

    teachers: Any = CHEN_TEACHERS
    schedule: Any = Ramp("linear", 1000)
    initial_prob: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "teachers", _teacher_specs(self.teachers))
        object.__setattr__(self, "schedule", _ramp(self.schedule))
        if self.initial_prob is not None and not 0.0 <= float(self.initial_prob) <= 1.0:
            raise ValueError(f"self_improving.initial_prob must lie in [0, 1], got {self.initial_prob}")

    def learned_prob(self, outer_step: jax.Array) -> jax.Array:
        p0 = 1.0 / (1 + len(self.teachers)) if self.initial_prob is None else float(self.initial_prob)
        return p0 + (1.0 - p0) * self.schedule(outer_step)

    def probs(self, outer_step: jax.Array) -> jax.Array:
        """[1 + #teachers] probabilities, the learned optimizer's first."""
        p = self.learned_prob(outer_step)
        k = len(self.teachers)
        return jnp.concatenate([p[None], jnp.full((k,), (1.0 - p) / k)])

    def init(self, params: Any) -> tuple:
        return tuple(build_teacher(s).init(params) for s in self.teachers)

    def choose(self, key: jax.Array, outer_step: jax.Array) -> jax.Array:
        """Index of the optimizer whose update is taken: 0 learned, 1.. teachers."""
        p = self.learned_prob(outer_step)
        u = jax.random.uniform(key)
        k = len(self.teachers)
        teacher = jnp.floor((u - p) / jnp.maximum(1.0 - p, 1e-12) * k).astype(jnp.int32)
        return jnp.where(u < p, 0, 1 + jnp.clip(teacher, 0, k - 1))

    def mix(self, grads, params, loss, lo_updates, teacher_states, outer_step, key):
        del loss
        choice = self.choose(key, outer_step)
        updates, new_states = lo_updates, []
        for i, (spec, st) in enumerate(zip(self.teachers, teacher_states)):
            t_updates, st = build_teacher(spec).update(grads, st, params)
            new_states.append(st)
            updates = jax.tree.map(
                lambda t, u: jnp.where(choice == i + 1, t.astype(u.dtype), u), t_updates, updates
            )
        return updates, tuple(new_states)


# --- Chen et al. 2020 imitation episodes --------------------------------------------------------


class ImitationState(NamedTuple):
    base: Any  # the wrapped estimator's state
    prob: jax.Array  # float32 scalar r: probability that an outer step is an imitation episode


@dataclasses.dataclass(frozen=True)
class Imitation:
    """Wraps ``base``: with probability r (``prob``, kept in the state so the host may change
    it per curriculum stage) an outer step is a Chen et al. 2020 Alg. 2 imitation episode.

    prob: r, a float, or one r per curriculum stage (Chen et al. 2020 schedule r per stage;
      the last value repeats for later stages). ``lopt.outer.train`` sets stage s's value at
      the start of the stage (:meth:`prob_at`, :func:`set_imitation_prob`); a per-stage tuple
      needs an enabled ``config.curriculum``.

    teachers: drawn uniformly per episode (names or dicts, see :func:`teacher_spec`).
    length: teacher trajectory length T (a shape; default N_train, the horizon's length:
      :meth:`episode_length`).
    normalize: ``"teacher"`` divides the loss by sum_t w_t ||dtheta_teacher_t||^2 (scale-free
      across teachers and tasks), ``"none"`` is the plain weighted sum of squares.
    weights: w_t, ``"uniform"`` (1/T) or ``"linear"`` (proportional to t + 1, later steps
      weigh more).
    checkpoint: backprop through the episode with O(sqrt(T)) memory.

    In an imitation step the base estimator's state is untouched (its particles wait) and its
    metrics read 0; ``imitation`` (1 or 0) and ``imitation_loss`` tell the two kinds apart.
    """

    base: Estimator
    prob: float | tuple[float, ...] = 0.5
    teachers: Any = CHEN_TEACHERS
    length: int | None = None
    normalize: str = "teacher"
    weights: str = "uniform"
    checkpoint: bool = True

    def __post_init__(self):
        object.__setattr__(self, "teachers", _teacher_specs(self.teachers))
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
        """T of an imitation episode: ``length``, or by default the trajectory length N_train
        (Alg. 2: "Generate an optimization trajectory T = [(g_1, dtheta_1), ...,
        (g_Ntrain, dtheta_Ntrain)]"), i.e. the horizon's maximum; under the curriculum each
        stage's trainer has the constant horizon N_train of its stage, so episodes follow it."""
        return int(self.length or unroller.horizon.max_length)

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> ImitationState:
        r = jnp.asarray(self.prob_at(0), jnp.float32)
        return ImitationState(self.base.init(unroller, key, meta_params), r)

    # -- the imitation loss -------------------------------------------------------------------

    def episode_loss(
        self, unroller: Unroller, meta_params: MetaParams, key: jax.Array, teacher: TeacherSpec
    ) -> jax.Array:
        """L_IL of one task instance: the teacher trains it for T steps from a fresh init; at
        each step the learned optimizer (its state advanced along the teacher's trajectory)
        proposes an update for the same gradient and params."""
        task = unroller.task_family
        teacher_opt = build_teacher(teacher)
        opt = unroller.learned_opt.optimizer(meta_params)
        length = self.episode_length(unroller)
        k_init, k_steps = jax.random.split(key)
        ps = unroller.fresh_particle(meta_params, k_init, jnp.zeros([], jnp.int32))
        params = jax.lax.stop_gradient(ps.params)
        carry = unroller.vary((params, ps.opt_state, teacher_opt.init(params)))

        def body(carry, k):
            params, lo_state, t_state = carry
            batch = task.batch(ps.spec, k, "train")
            (loss, _), grads = jax.value_and_grad(task.loss, argnums=1, has_aux=True)(ps.spec, params, batch)
            t_updates, t_state = teacher_opt.update(grads, t_state, params)
            lo_updates, lo_state = opt.update(grads, lo_state, params, loss=loss)
            t_updates = jax.lax.stop_gradient(t_updates)
            d, n = _sq_dist(t_updates, lo_updates), _sq_norm(t_updates)
            params = jax.lax.stop_gradient(optax.apply_updates(params, t_updates))
            return (params, lo_state, t_state), (d, n)

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
        """(mean L_IL over this device's particles, its gradient) with the teacher
        ``teacher_index`` (a traced scalar: one ``lax.switch`` over the teachers)."""
        keys = particle_keys(unroller, key)

        def loss_fn(theta):
            def run(spec):
                return lambda th: jax.vmap(lambda k: self.episode_loss(unroller, th, k, spec))(keys).mean()

            return jax.lax.switch(teacher_index, [run(s) for s in self.teachers], theta)

        return jax.value_and_grad(loss_fn)(per_device(unroller, meta_params))

    # -- the estimator ---------------------------------------------------------------------------

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: ImitationState, key: jax.Array
    ) -> tuple[MetaParams, ImitationState, dict]:
        k_coin, k_teacher, k_episode, k_base = jax.random.split(key, 4)
        is_imitation = jax.random.uniform(k_coin) < state.prob
        teacher = jax.random.randint(k_teacher, (), 0, len(self.teachers))
        length = self.episode_length(unroller)

        traced = {}  # the normal branch's metric shapes, recorded when it is traced

        def normal(_):
            grad, base, metrics = self.base.grad(unroller, meta_params, state.base, k_base)
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


def set_imitation_prob(state: ImitationState, prob: float) -> ImitationState:
    """The same estimator state with imitation probability r = ``prob`` (host side, e.g. per
    curriculum stage; the compiled outer step is reused, r being data)."""
    if not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"imitation probability must lie in [0, 1], got {prob}")
    r = jnp.asarray(prob, jnp.float32)
    sharding = getattr(state.prob, "sharding", None)
    return state._replace(prob=r if sharding is None else jax.device_put(r, sharding))


__all__ = [
    "BehaviourCloning",
    "CHEN_TEACHERS",
    "Imitation",
    "ImitationState",
    "Ramp",
    "SelfImproving",
    "behaviour_cloning_from_config",
    "build_teacher",
    "self_improving_from_config",
    "set_imitation_prob",
    "teacher_spec",
    "wrap_estimator",
]


# --- config sections ---------------------------------------------------------------------------


def section_options(section: Any, where: str, factory: Any) -> dict | None:
    """Options of an optional config section for ``factory``: None when the section is None,
    empty, or has ``enabled: False``; unknown keys raise ``ConfigError`` naming ``config.<where>``."""
    from tasks.registry import ConfigError, check_kwargs

    if section is None:
        return None
    options = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    if not options or not options.pop("enabled", True):
        return None
    try:
        check_kwargs(f"config.{where}", factory, options)
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    return options


def _build(factory: Any, options: dict | None, where: str) -> Any:
    from tasks.registry import ConfigError

    if options is None:
        return None
    try:
        return factory(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{where}: {e}") from None


def behaviour_cloning_from_config(section: Any) -> BehaviourCloning | None:
    """``config.unroll.behaviour_cloning`` (keys of :class:`BehaviourCloning`, plus ``enabled``)."""
    where = "unroll.behaviour_cloning"
    return _build(BehaviourCloning, section_options(section, where, BehaviourCloning), where)


def self_improving_from_config(section: Any) -> SelfImproving | None:
    """``config.unroll.self_improving`` (keys of :class:`SelfImproving`, plus ``enabled``)."""
    where = "unroll.self_improving"
    return _build(SelfImproving, section_options(section, where, SelfImproving), where)


def wrap_estimator(estimator: Estimator, section: Any) -> Estimator:
    """``config.imitation`` (keys of :class:`Imitation` but ``base``, plus ``enabled``): the
    estimator wrapped in imitation episodes, or unchanged when the section is off."""
    options = section_options(section, "imitation", Imitation)
    if options is not None and "base" in options:
        from tasks.registry import ConfigError

        raise ConfigError("config.imitation: 'base' is the configured estimator; remove it")
    return estimator if options is None else _build(
        lambda **kw: Imitation(estimator, **kw), options, "imitation"
    )
