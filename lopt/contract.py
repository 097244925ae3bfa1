"""The learned-optimizer contract, checked before anything compiles (docs/extending.md).

:func:`check_learned_optimizer` traces, with ``jax.eval_shape`` (nothing compiled or
computed), what the inner loop does with a learned optimizer (``lopt.base.LearnedOptimizer``):
``init(key)`` meta-params of float arrays; ``optimizer(meta_params)`` an optax transformation
whose ``update`` takes the keyword arguments the inner loop passes and returns updates with the
parameters' tree structure and shapes, and a state like the one ``init`` made (``lax.scan``
carries it). A break is one :class:`~tasks.contract.ContractError` line.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lopt.base import build_optimizer
from tasks.contract import KEY, ContractError, check_arrays, check_static, describe, path_of

#: The keyword arguments the inner loop passes to ``update`` (estimators.unroll.Unroller).
UPDATE_KWARGS = ("value", "outer_step", "key")
#: Params to check an optimizer on when no task gives its own: a dense layer.
DEFAULT_PARAMS = {"b": jax.ShapeDtypeStruct((2,), jnp.float32),
                  "w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}


def _leaves(tree: Any) -> dict[str, Any]:
    return {path_of("", p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _compare(what: str, mine: Any, theirs: Any, mine_is: str, theirs_is: str, why: str,
             *, dtypes: bool) -> None:
    """ContractError unless ``mine`` has the structure, shapes (and ``dtypes``) of ``theirs``."""
    a, b = _leaves(mine), _leaves(theirs)
    if jax.tree.structure(mine) != jax.tree.structure(theirs):
        lack, extra = [k for k in b if k not in a], [k for k in a if k not in b]
        diff = "; ".join(x for x in (
            lack and f"it lacks {', '.join(lack[:3])}", extra and f"it adds {', '.join(extra[:3])}")
            if x) or f"{jax.tree.structure(mine)} vs {jax.tree.structure(theirs)}"
        raise ContractError(f"{what}: {mine_is} changed the tree structure of {theirs_is} "
                            f"({diff}); {why}")
    for k, x in a.items():
        y = b[k]
        if jnp.shape(x) != jnp.shape(y) or (dtypes and jnp.result_type(x) != jnp.result_type(y)):
            raise ContractError(
                f"{what}: {mine_is}{k} is {jnp.result_type(x)}{list(jnp.shape(x))} where "
                f"{theirs_is}{k} is {jnp.result_type(y)}{list(jnp.shape(y))}; {why}")


def check_learned_optimizer(learned_opt: Any, params: Any = None, what: str | None = None) -> None:
    """Raise :class:`ContractError` if ``learned_opt`` (or an inner-update wrapper of one)
    breaks the LearnedOptimizer contract on ``params`` (a pytree of arrays or
    ``jax.ShapeDtypeStruct``; default :data:`DEFAULT_PARAMS`, or a task's
    :func:`tasks.contract.example_params`)."""
    what = what or describe(learned_opt, "learned optimizer")
    check_static(learned_opt, what, "LearnedOptimizer",
                 {"init": "(key)", "optimizer": "(meta_params)"})
    params = DEFAULT_PARAMS if params is None else params

    def trace(key, params):
        meta_params = learned_opt.init(key)
        check_arrays(meta_params, what, "init(key)", "meta-params are differentiated and "
                     "exported (float arrays)", floating=True)
        opt = build_optimizer(learned_opt, meta_params, num_steps=100)
        if not (callable(getattr(opt, "init", None)) and callable(getattr(opt, "update", None))):
            raise ContractError(f"{what}: optimizer(meta_params) returned {type(opt).__name__}; "
                                "it must be an optax.GradientTransformationExtraArgs (init, update)")
        state = opt.init(params)
        grads = jax.tree.map(jnp.zeros_like, params)
        extra = dict(value=jnp.zeros([], jnp.float32), outer_step=jnp.zeros([], jnp.int32), key=key)
        try:
            out = opt.update(grads, state, params, **extra)
        except TypeError as e:
            if "argument" not in str(e):
                raise
            raise ContractError(
                f"{what}: update(grads, state, params, value=, outer_step=, key=) raised "
                f"TypeError: {' '.join(str(e).split())}; the inner loop passes these keywords: "
                "make it an optax.GradientTransformationExtraArgs whose update takes "
                "**extra_args") from None
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ContractError(f"{what}: update(...) returned {type(out).__name__}; it must "
                                "return (updates, new_state)")
        updates, new_state = out
        _compare(what, updates, params, "update(...)'s updates", "the params",
                 "updates must be shaped like the params (optax.apply_updates adds them)",
                 dtypes=False)
        _compare(what, new_state, state, "update(...)'s new state", "init(params)'s state",
                 "lax.scan carries the state, so update must return it as init makes it",
                 dtypes=True)
        return updates

    jax.eval_shape(trace, KEY, params)
