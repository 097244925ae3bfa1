"""The task-family contract, checked before anything compiles (docs/extending.md).

A user's task family that breaks the contract of :class:`tasks.base.TaskFamily` would fail deep
inside the first compile of the outer step, as a traceback through ``vmap`` and ``scan``. Here
it fails first, in one line naming the family, the method and what is wrong:
:func:`check_task_family` traces ``sample``, ``init``, ``batch`` and ``loss`` with
``jax.eval_shape`` (shapes and structures only, nothing compiled or computed).

:class:`ContractError` is a :class:`~tasks.registry.ConfigError`, so the commands print it as
the one line it is. The learned-optimizer and estimator checks (``lopt.contract``,
``estimators.contract``) share the helpers here.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np

from tasks.base import SPLITS
from tasks.registry import ConfigError


#: The key the checks trace with: its shape and dtype only (a raw ``jax.random.PRNGKey``), so
#: not even the key is computed.
KEY = jax.ShapeDtypeStruct((2,), np.uint32)


class ContractError(ConfigError):
    """A component breaks its protocol's contract; the message is one line saying which
    component, which method, and what is wrong."""


def describe(component: Any, kind: str) -> str:
    """``kind 'name' (module.Class)``: how an error names a component."""
    cls = type(component)
    name = getattr(component, "name", None)
    label = f" '{name}'" if isinstance(name, str) else ""
    return f"{kind}{label} ({cls.__module__}.{cls.__qualname__})"


def check_static(component: Any, what: str, protocol: str, methods: dict[str, str],
                 attributes: Iterable[str] = ()) -> None:
    """The methods (name -> its signature, for the message) and attributes ``protocol``
    requires, and hashability: every component is static configuration (a frozen dataclass)
    that ``jax.jit`` hashes."""
    for attr in attributes:
        if not hasattr(component, attr):
            raise ContractError(f"{what} has no attribute '{attr}', which the {protocol} "
                                "contract requires")
    for method, signature in methods.items():
        if not callable(getattr(component, method, None)):
            raise ContractError(f"{what} has no method {method}{signature}, which the "
                                f"{protocol} contract requires")
    try:
        hash(component)
    except TypeError:
        raise ContractError(f"{what} is not hashable; make it a frozen dataclass "
                            "(@dataclasses.dataclass(frozen=True)): it is static configuration "
                            "that jax.jit hashes") from None


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def path_of(prefix: str, path: tuple) -> str:
    """``prefix['a'][0]``: where a leaf sits, as Python would index it."""
    return prefix + jax.tree_util.keystr(path)


def check_arrays(tree: Any, what: str, where: str, why: str, *, floating: bool = False) -> None:
    """Every leaf of ``tree`` (named ``where`` in the message) is an array (a floating one with
    ``floating``); else a ContractError naming the first leaf that is not, and ``why``."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not _is_array(leaf):
            raise ContractError(f"{what}: {path_of(where, path)} is {type(leaf).__name__} "
                                f"{_short(leaf)}, not an array; {why}")
        if floating and not np.issubdtype(np.dtype(leaf.dtype), np.inexact):
            raise ContractError(f"{what}: {path_of(where, path)} has dtype {leaf.dtype}, not a "
                                f"float; {why}")


def check_task_family(family: Any, splits: Iterable[str] = SPLITS) -> None:
    """Raise :class:`ContractError` if ``family`` breaks the TaskFamily contract: the methods
    and ``name``, hashable, ``sample`` returning a Spec of arrays only, ``init`` float params,
    ``batch`` arrays for every split, and ``loss`` returning ``(scalar loss, dict)``."""
    what = describe(family, "task family")
    check_static(family, what, "TaskFamily", {
        "sample": "(key)", "init": "(spec, key)", "loss": "(spec, params, batch)",
        "batch": "(spec, key, split)"}, attributes=("name",))
    if not isinstance(family.name, str):
        raise ContractError(f"{what}: name must be a str, got {_short(family.name)}")

    def trace(key):
        spec = family.sample(key)
        check_arrays(spec, what, "sample(key)", "a Spec holds only arrays (jnp.asarray the "
                     "value; Python constants belong in the dataclass's fields), so vmap runs "
                     "many instances")
        params = family.init(spec, key)
        check_arrays(params, what, "init(spec, key)", "params are differentiated and carried "
                     "through lax.scan (use float arrays)", floating=True)
        for split in splits:
            batch = family.batch(spec, key, split)
            check_arrays(batch, what, f"batch(spec, key, {split!r})", "batches are drawn inside "
                         "jit (index device arrays with jax.random)")
        out = family.loss(spec, params, family.batch(spec, key, "train"))
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            got = (f"an array of shape {np.shape(out)}" if _is_array(out) else
                   f"{type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else
                   type(out).__name__)
            raise ContractError(f"{what}: loss(spec, params, batch) returned {got}; it must "
                                "return (scalar loss, aux dict)")
        loss, aux = out
        if not _is_array(loss) or np.shape(loss) != ():
            shape = np.shape(loss) if _is_array(loss) else type(loss).__name__
            raise ContractError(f"{what}: loss(spec, params, batch) returned a loss of shape "
                                f"{shape}; it must be a scalar (e.g. the mean over the batch)")
        if not np.issubdtype(np.dtype(loss.dtype), np.inexact):
            raise ContractError(f"{what}: loss(spec, params, batch) returned a {loss.dtype} "
                                "loss; it must be a float to be differentiated")
        if not isinstance(aux, dict):
            raise ContractError(f"{what}: loss(spec, params, batch) returned aux "
                                f"{type(aux).__name__}; it must be a dict of metrics ({{}} if "
                                "none; 'accuracy' is reported when present)")
        return params

    jax.eval_shape(trace, KEY)


def example_params(family: Any) -> Any:
    """Shapes and dtypes of one instance's params (``jax.ShapeDtypeStruct`` leaves)."""
    return jax.eval_shape(lambda k: family.init(family.sample(k), k), KEY)
