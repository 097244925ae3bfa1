"""``MetaTrainer``: one compiled outer step (DESIGN.md, "the training layer").

``MetaTrainer.step`` runs, inside a single ``jax.jit`` with the state donated: the estimator's
meta-gradient (task sampling, batch sampling and every particle's truncated unroll included)
and the meta-optimizer update. The meta-optimizer is wrapped in ``optax.apply_if_finite``: a
non-finite meta-gradient is never applied (the meta-params and the meta-optimizer's inner
state stay as they were) and is counted (``num_skipped``; ``consecutive_skipped`` for the run's
health check in ``lopt.training.loop``).

An estimator with several objectives (``objectives``, e.g. imitation's ``("meta_loss",
"imitation")``) gets one meta-optimizer state per objective (:func:`per_objective`): each step's
gradient, reported as ``metrics["objective"]``, updates its own objective's state only, so an
objective whose gradients are orders of magnitude larger cannot take over the other's Adam
moments (DESIGN.md, "Each objective keeps its own meta-optimizer state").

Building a trainer checks, before anything is traced for real, what the estimator needs of the
unroll (``estimators.base.check_unroll``) and every component against its contract
(``estimators.contract.check_components``: traced with ``jax.eval_shape``), each failure one line.

Particles are sharded over a 1-D mesh (one device: a mesh of one) with ``jax.shard_map``;
each estimator declares which of its state leaves are per-particle (``Estimator.partition``),
everything else is replicated. Meta-gradients are averaged with ``lax.pmean``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from estimators import keys as keys_lib
from estimators import threefry
from estimators.base import Estimator, at_stage, check_unroll
from estimators.contract import check_components
from estimators.schedules import Schedule
from estimators.unroll import Unroller
from lopt.wrappers import unwrap
from tasks.base import bind_data, data_arrays

PARTICLE_AXIS = "particles"
#: Estimator metrics that count things (summed over devices) or take a maximum; all others are
#: means over devices (every device holds the same number of particles).
COUNT_METRICS = frozenset({"inner_steps", "trajectories_done"})
MAX_METRICS = frozenset({"position_max"})
#: apply_if_finite applies a non-finite update after this many in a row; never, here: the
#: training loop stops a run whose meta-gradients keep failing (lopt.training.loop).
_NEVER = 2**31 - 1


def objectives(estimator: Estimator) -> tuple[str, ...]:
    """The objectives whose gradients ``estimator`` returns (default: the meta-loss alone)."""
    return tuple(getattr(estimator, "objectives", ("meta_loss",)))


def per_objective(inner: optax.GradientTransformation, num: int) -> optax.GradientTransformationExtraArgs:
    """``inner`` with one state per objective: ``update(..., objective=i)`` applies ``inner``
    with objective i's state and leaves the others' as they are (a traced index: one
    ``lax.switch``, so one compiled step serves every objective)."""

    def init_fn(params):
        return tuple(inner.init(params) for _ in range(num))

    def update_fn(updates, state, params=None, *, objective, **extra):
        def branch(i):
            def fn(updates, state):
                u, s_i = inner.update(updates, state[i], params)
                return u, tuple(s_i if j == i else s for j, s in enumerate(state))

            return fn

        return jax.lax.switch(objective, [branch(i) for i in range(num)], updates, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class MetaTrainState(NamedTuple):
    meta_params: Any
    meta_opt_state: Any  # optax.ApplyIfFiniteState around the meta-optimizer's state
    estimator_state: Any
    outer_step: jax.Array  # int32: the run's one clock
    key: jax.Array  # uint32[2]

    @property
    def num_skipped(self) -> jax.Array:
        """Outer steps whose meta-gradient was non-finite (and not applied)."""
        return self.meta_opt_state.total_notfinite

    @property
    def consecutive_skipped(self) -> jax.Array:
        return self.meta_opt_state.notfinite_count


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class MetaTrainer:
    """Meta-trains ``unroller.learned_opt`` with ``estimator`` and ``meta_optimizer``.

    ``unroller`` describes all particles (its ``num_particles`` is the global count); the
    trainer shards it over ``mesh`` (default: the first device). :meth:`create` builds the
    unroller from its parts.
    """

    unroller: Unroller
    estimator: Estimator
    meta_optimizer: optax.GradientTransformation
    mesh: Mesh | None = None

    def __post_init__(self):
        # Straight-line Threefry on CPU: same random bits, fewer kernels per inner step and
        # faster compiles (estimators/threefry.py); LOPT_THREEFRY=rolled keeps JAX's lowering.
        threefry.install()
        if self.mesh is not None:
            if len(self.mesh.axis_names) != 1:
                raise ValueError(
                    f"MetaTrainer shards particles over a 1-D mesh; got axes {self.mesh.axis_names}"
                )
        check_unroll(self.estimator, self.unroller, 1 if self.mesh is None else self.mesh.size)
        # Every component against its contract, one line each (traced, never compiled).
        check_components(self.unroller, self.estimator)

    @classmethod
    def create(
        cls,
        *,
        task_family,
        learned_opt,
        estimator: Estimator,
        meta_optimizer: optax.GradientTransformation,
        num_particles: int = 8,
        trunc_length: int = 20,
        horizon: Schedule,
        mesh: Mesh | None = None,
        **unroll_options,
    ) -> "MetaTrainer":
        """The trainer of DESIGN.md's example: the unroller from its parts (``unroll_options``:
        ``meta_loss``, ``reset``, ``trunc_schedule``, ``stagger``, ``particle_chunk``)."""
        unroller = Unroller(task_family, learned_opt, num_particles, trunc_length, horizon,
                            **unroll_options)
        return cls(unroller, estimator, meta_optimizer, mesh)

    # -- views ----------------------------------------------------------------------------------

    @property
    def task_family(self):
        return self.unroller.task_family

    @property
    def learned_opt(self):
        """The learned optimizer being meta-trained (inside any inner-update wrapper)."""
        return unwrap(self.unroller.learned_opt)

    @property
    def trunc_length(self) -> int:
        return self.unroller.trunc_length

    @property
    def horizon(self) -> Schedule:
        return self.unroller.horizon

    def with_horizon(self, horizon: Schedule) -> "MetaTrainer":
        """The same trainer with trajectories of ``horizon`` (a curriculum stage: one compile of
        the outer step per stage)."""
        return dataclasses.replace(self, unroller=dataclasses.replace(self.unroller, horizon=horizon))

    # -- sharding: the particle axis over a 1-D mesh ------------------------------------------------

    @functools.cached_property
    def _mesh(self) -> Mesh:
        if self.mesh is not None:
            return self.mesh
        return Mesh(np.asarray(jax.devices()[:1]), (PARTICLE_AXIS,))

    @property
    def num_devices(self) -> int:
        return self._mesh.size

    @functools.cached_property
    def local_unroller(self) -> Unroller:
        """One device's shard of the unroller (used inside ``shard_map``)."""
        return self.unroller.sharded(self._mesh.axis_names[0], self.num_devices)

    @functools.cached_property
    def _meta_opt(self) -> optax.GradientTransformation:
        num = len(objectives(self.estimator))
        inner = self.meta_optimizer if num == 1 else per_objective(self.meta_optimizer, num)
        return optax.apply_if_finite(inner, max_consecutive_errors=_NEVER)

    def _bound_unroller(self, arrays: Any) -> Unroller:
        """The unroller whose task family reads the dataset passed into jit as ``arrays``."""
        if arrays is None:
            return self.local_unroller
        return dataclasses.replace(self.local_unroller, task_family=bind_data(self.task_family, arrays))

    @functools.cached_property
    def state_specs(self) -> MetaTrainState:
        """PartitionSpecs of the train state: the estimator's per-particle leaves (its
        ``partition``) are sharded over the mesh, everything else is replicated."""
        axis = self._mesh.axis_names[0]
        unsharded = dataclasses.replace(self.local_unroller, shard_axis=None)  # same local shapes
        arrays = data_arrays(self.task_family)

        def est_init(key, arrays):
            u = unsharded if arrays is None else dataclasses.replace(
                unsharded, task_family=bind_data(self.task_family, arrays))
            return self.estimator.init(u, key, self.unroller.learned_opt.init(key))

        shapes = jax.eval_shape(est_init, jax.random.PRNGKey(0), arrays)
        flags = self.estimator.partition(shapes)
        est_specs = jax.tree.map(lambda f, _: P(axis) if f else P(), flags, shapes)
        return MetaTrainState(P(), P(), est_specs, P(), P())

    def _shard(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self._mesh, in_specs=in_specs, out_specs=out_specs)

    # -- init and step --------------------------------------------------------------------------

    @functools.cached_property
    def _one_call_at_a_time(self) -> bool:
        """Whether each compiled call is waited for before the next is dispatched: on CPU with
        several devices (``--cpu_devices``, forced host devices). There, XLA:CPU (jaxlib 0.10)
        launches the devices' parts of a call from a thread pool, and one device's part of
        outer step k + 1 can take that device's only in-flight slot before its part of step k
        (which k + 1 waits for): the other devices then wait in step k's meta-gradient
        all-reduce until XLA aborts the process after 40 s. W1 on 2 and 4 CPU devices hung in 6
        of 48 runs (20-600 outer steps each; a gdb trace of a hung process shows the two
        launches) and in none of 42 runs with this wait. A step takes tens of milliseconds, so
        the wait costs no measurable throughput; GPU and TPU runs keep dispatching ahead."""
        devices = list(self._mesh.devices.flat)
        return len(devices) > 1 and all(d.platform == "cpu" for d in devices)

    def _settled(self, out: Any) -> Any:
        if self._one_call_at_a_time:
            jax.block_until_ready(out)
        return out

    def init(self, key: jax.Array) -> MetaTrainState:
        """A new train state from ``key`` (``jax.random.key`` or ``jax.random.PRNGKey``; the
        state holds it as raw key data either way)."""
        return self._settled(self._init_fn(keys_lib.raw(key), data_arrays(self.task_family)))

    @functools.cached_property
    def _init_fn(self):
        def init(key, arrays):
            k_meta, k_est, k_next = jax.random.split(key, 3)
            meta_params = self.unroller.learned_opt.init(k_meta)
            return MetaTrainState(
                meta_params=meta_params,
                meta_opt_state=self._meta_opt.init(meta_params),
                estimator_state=self.estimator.init(self._bound_unroller(arrays), k_est, meta_params),
                outer_step=jnp.zeros([], jnp.int32),
                key=k_next,
            )

        return jax.jit(self._shard(init, (P(), P()), self.state_specs))

    def init_stage(self, state: MetaTrainState, stage: int, key: jax.Array) -> MetaTrainState:
        """``state`` with a fresh estimator state (new particles) drawn from ``key`` and set for
        curriculum stage ``stage`` (``Estimator.at_stage``); meta-params, meta-optimizer state
        and the clock are kept."""
        fresh = self.init(key)
        return state._replace(estimator_state=at_stage(self.estimator, fresh.estimator_state, stage))

    def step(self, state: MetaTrainState) -> tuple[MetaTrainState, dict]:
        """One outer step (compiled once; ``state`` is donated)."""
        return self._settled(self._step_fn(state, data_arrays(self.task_family)))

    @functools.cached_property
    def _step_fn(self):
        sharded = self._shard(self._step, (self.state_specs, P()), (self.state_specs, P()))
        return jax.jit(sharded, donate_argnums=0)

    def _step(self, state: MetaTrainState, arrays: Any = None) -> tuple[MetaTrainState, dict]:
        """The per-device outer step (runs inside ``shard_map``)."""
        axis = self._mesh.axis_names[0]
        key, k_grad = jax.random.split(state.key)
        grad, est_state, metrics = self.estimator.grad(
            self._bound_unroller(arrays), state.meta_params, state.estimator_state, k_grad,
            state.outer_step,
        )
        grad = jax.lax.pmean(grad, axis)  # every device holds the same number of particles
        which = {}  # which objective's meta-optimizer state this gradient updates
        if len(objectives(self.estimator)) > 1:
            which["objective"] = metrics.pop("objective")

        def combine(name, value):
            if name in COUNT_METRICS:
                return jax.lax.psum(value, axis)
            if name in MAX_METRICS:
                return jax.lax.pmax(value, axis)
            return jax.lax.pmean(value, axis)

        metrics = {k: combine(k, v) for k, v in metrics.items()}
        finite = _all_finite(grad)
        updates, opt_state = self._meta_opt.update(grad, state.meta_opt_state, state.meta_params, **which)
        safe_grad = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grad)
        metrics.update(
            grad_norm=optax.global_norm(safe_grad),
            update_norm=optax.global_norm(updates),
            grad_finite=finite,
            num_skipped=opt_state.total_notfinite,
            consecutive_skipped=opt_state.notfinite_count,
        )
        new_state = MetaTrainState(
            meta_params=optax.apply_updates(state.meta_params, updates),
            meta_opt_state=opt_state,
            estimator_state=est_state,
            outer_step=state.outer_step + 1,
            key=key,
        )
        return new_state, metrics
