"""The estimator and reset-policy contracts, and the check of every component a meta-training
run is built from, before anything compiles (docs/extending.md).

:func:`check_components` runs the task family's (``tasks.contract``), the inner update's
(``lopt.contract``), the reset policy's and the estimator's checks on an
:class:`~estimators.unroll.Unroller`, tracing with ``jax.eval_shape`` only. A component that
breaks its contract is one :class:`~tasks.contract.ContractError` line naming it, the method and
what is wrong, where it would otherwise be a traceback from inside the first compile.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from estimators.unroll import Unroller
from lopt.contract import _compare, check_learned_optimizer
from lopt.wrappers import unwrap
from tasks.contract import KEY, ContractError, check_static, check_task_family, describe, example_params

ESTIMATOR_METHODS = {"init": "(unroller, key, meta_params)",
                     "grad": "(unroller, meta_params, state, key, outer_step)",
                     "partition": "(state)"}
_AXIS = "particles"  # the mesh axis the checks trace under (the trainer's name)
RESET_METHODS = {"init": "(example)", "draw": "(state, keys, outer_step)",
                 "push_index": "(keys, n_steps)",
                 "observe": "(state, offered, valid, shard_axis, num_shards)"}


def _takes(fn: Any, what: str, method: str, *args: Any) -> None:
    """ContractError unless ``fn`` can be called with ``args`` (positionally)."""
    try:
        inspect.signature(fn).bind(*args)
    except TypeError as e:
        raise ContractError(f"{what}: {method}{ESTIMATOR_METHODS.get(method) or RESET_METHODS[method]} "
                            f"cannot be called so ({e})") from None
    except ValueError:  # no signature to read (a builtin): let the call tell
        pass


def check_reset_policy(policy: Any, unroller: Unroller) -> None:
    """Raise :class:`ContractError` if ``policy`` breaks the reset-policy contract
    (``estimators/resets.py``): its methods and ``segment_reset``; ``draw`` a [P] bool and
    ``None`` or particle states; ``push_index`` ``None`` or [P] integers; ``observe`` a state
    like ``init``'s (the train state carries it from one outer step to the next), the same on
    every device. It is traced as the trainer runs it, inside ``shard_map`` (on one device)."""
    what = describe(policy, "reset policy")
    check_static(policy, what, "reset-policy", RESET_METHODS, attributes=("segment_reset",))
    if not isinstance(policy.segment_reset, bool):
        raise ContractError(f"{what}: segment_reset must be True or False, got "
                            f"{policy.segment_reset!r}")
    _takes(policy.observe, what, "observe", None, None, None, None, 1)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (_AXIS,))
    local = unroller.sharded(_AXIS, 1)
    p = local.num_particles

    def trace(key):
        particles = local.init(local.learned_opt.init(key), key).particles
        state = policy.init(jax.tree.map(lambda x: x[0], particles))
        keys = local.particle_keys(key)
        restore, restored = policy.draw(state, keys, jnp.zeros([], jnp.int32))
        if jnp.shape(restore) != (p,) or jnp.result_type(restore) != jnp.bool_:
            raise ContractError(f"{what}: draw(state, keys, outer_step) returned restore "
                                f"{jnp.result_type(restore)}{list(jnp.shape(restore))}; it must "
                                f"be bool[{p}], one flag per particle")
        if restored is not None:
            _compare(what, restored, particles, "draw(...)'s restored states", "the particles",
                     "restored states are particle states, one per particle", dtypes=True)
        push = policy.push_index(keys, jnp.asarray(local.trunc_length, jnp.int32))
        if push is not None and (jnp.shape(push) != (p,) or
                                 not jnp.issubdtype(jnp.result_type(push), jnp.integer)):
            raise ContractError(f"{what}: push_index(keys, n_steps) returned "
                                f"{jnp.result_type(push)}{list(jnp.shape(push))}; it must be None "
                                f"or int[{p}], the step after which each particle offers its state")
        new = policy.observe(state, particles, local.vary(jnp.ones((p,), bool)), _AXIS, 1)
        _compare(what, new, state, "observe(...)'s state", "init(example)'s state",
                 "the train state carries it from one outer step to the next", dtypes=True)
        return {"init": state, "observe": new}

    key = KEY
    try:  # the state's structure, then the trace that checks it is replicated, leaf by leaf
        shapes = jax.eval_shape(jax.shard_map(trace, mesh=mesh, in_specs=P(), out_specs=P(),
                                              check_vma=False), key)
        specs = jax.tree.map(lambda _: P(), shapes)
        jax.eval_shape(jax.shard_map(trace, mesh=mesh, in_specs=P(), out_specs=specs), key)
    except ContractError:
        raise
    except ValueError as e:
        where = re.search(r"out_specs(\S+) is P\(\)", str(e))
        if where is None:
            raise
        raise ContractError(
            f"{what}: its state is replicated (the same on every device) but {where.group(1)} "
            "is made from per-particle values; build the state from shapes (jnp.zeros(x.shape, "
            "x.dtype), not zeros_like) and gather the offers in observe "
            "(estimators.resets.gather_replicated)") from None


def check_estimator(estimator: Any, unroller: Unroller) -> None:
    """Raise :class:`ContractError` if ``estimator`` breaks the Estimator contract
    (``estimators/base.py``): its methods and their arguments, hashable, and ``partition``
    marking the state's leaves with bools (True: a leading per-particle axis)."""
    what = describe(estimator, "estimator")
    check_static(estimator, what, "Estimator", ESTIMATOR_METHODS)
    _takes(estimator.grad, what, "grad", unroller, None, None, None, None)
    _takes(estimator.init, what, "init", unroller, None, None)
    state = jax.eval_shape(lambda k: estimator.init(unroller, k, unroller.learned_opt.init(k)),
                           KEY)
    flags = estimator.partition(state)

    def visit(flag, sub):
        if not isinstance(flag, bool):
            raise ContractError(f"{what}: partition(state) holds {type(flag).__name__} "
                                f"{flag!r}; it must hold Python bools (True: per-particle)")
        if flag and any(len(x.shape) < 1 for x in jax.tree.leaves(sub)):
            raise ContractError(f"{what}: partition(state) marks a scalar per-particle; "
                                "per-particle leaves have a leading particle axis")

    try:
        jax.tree.map(visit, flags, state)
    except ContractError:
        raise
    except (ValueError, TypeError) as e:
        raise ContractError(f"{what}: partition(state) must return a tree of bools shaped like "
                            f"the state (True: per-particle); {' '.join(str(e).split())[:160]}"
                            ) from None


def check_components(unroller: Unroller, estimator: Any) -> None:
    """Every component of a run against its contract, in the order they are used: the task
    family, the learned optimizer (on the task's params), the inner update around it (when
    wrapped), the reset policy and the estimator."""
    family = unroller.task_family
    check_task_family(family, {"train", unroller.meta_loss.split})
    params = example_params(family)
    inner = unroller.learned_opt
    check_learned_optimizer(unwrap(inner), params)
    if unwrap(inner) is not inner:
        check_learned_optimizer(inner, params, describe(inner, "inner-update wrapper"))
    check_reset_policy(unroller.reset, unroller)
    check_estimator(estimator, unroller)
