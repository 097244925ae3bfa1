"""The learned-optimizer contract (DESIGN.md, "lopt/").

A :class:`LearnedOptimizer` is a static, hashable architecture description. Given its
meta-params it *is* an ``optax.GradientTransformationExtraArgs``, so the inner unroll, imitation
and behaviour cloning, and end users' training loops all use one code path:

    opt = learned_opt.optimizer(meta_params)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params, value=loss)
    params = optax.apply_updates(params, updates)

The loss travels as ``value=``, optax's own name (``reduce_on_plateau``, the zoom line search),
so one call also feeds optax's value-aware transformations chained with a learned optimizer;
the inner loop adds ``outer_step=`` and ``key=``, which an update may ignore (``**extra_args``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax

MetaParams = Any


@runtime_checkable
class LearnedOptimizer(Protocol):
    name: str

    def init(self, key: jax.Array) -> MetaParams:
        """Fresh meta-params."""

    def optimizer(self, meta_params: MetaParams) -> optax.GradientTransformationExtraArgs:
        """The inner optimizer these meta-params define."""


def reads_num_steps(learned_opt: Any) -> bool:
    """Whether ``learned_opt.optimizer`` takes the training horizon (``num_steps=``, e.g.
    ``velo``: DESIGN.md's ``optimizer(meta_params, num_steps=None)``)."""
    try:
        return "num_steps" in inspect.signature(learned_opt.optimizer).parameters
    except (TypeError, ValueError):
        return False


def build_optimizer(learned_opt: Any, meta_params: MetaParams, num_steps: Any = None, **options):
    """``learned_opt.optimizer(meta_params)``, given ``num_steps`` (the horizon, an int or a
    traced int array) when it reads it (:func:`reads_num_steps`); other optimizers ignore it.
    ``options`` (architecture-specific, e.g. velo's ``weight_decay``) are passed as they are."""
    if options:
        return learned_opt.optimizer(meta_params, num_steps=num_steps, **options)
    if num_steps is not None and reads_num_steps(learned_opt):
        return learned_opt.optimizer(meta_params, num_steps=num_steps)
    return learned_opt.optimizer(meta_params)


#: ``dataclasses.field`` metadata of a constructor option that changes how an update is
#: computed but not what (beyond float rounding), e.g. ``mlp``'s ``fused`` (a Pallas kernel
#: instead of plain jnp): it is not part of the architecture. :func:`config_of` leaves it out
#: while it has its default (so exports written without setting it are the exports written
#: before it existed, and older readers load them), and ``architecture_only=True`` always does
#: (what ``lopt.export`` compares when a caller passes the architecture to load into).
EXECUTION_OPTION = {"lopt_execution_option": True}


def config_of(learned_opt: LearnedOptimizer, *, architecture_only: bool = False) -> dict[str, Any]:
    """The constructor options of a dataclass learned optimizer (for export metadata), without
    the execution options (:data:`EXECUTION_OPTION`) left at their defaults, or without any with
    ``architecture_only``."""
    out = {}
    for f in dataclasses.fields(learned_opt):
        if f.init:
            v = getattr(learned_opt, f.name)
            if f.metadata.get("lopt_execution_option") and (
                architecture_only or (f.default is not dataclasses.MISSING and v == f.default)
            ):
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# --- small building blocks shared by the per-parameter learned optimizers --------------------


def tensor_rms_scale(x: jax.Array, axes: tuple[int, ...], eps: float = 1e-8) -> jax.Array:
    """1 / sqrt(mean(x^2) + eps) over ``axes``, kept as size-1 axes: the factor of
    :func:`tensor_rms_normalize` (the fused ``mlp`` update computes it outside its kernel).

    When a kept axis of size > 1 comes after the reduced ones (the momenta's trailing decay
    axis), the mean is taken with the kept axes moved first, so each kept entry reduces a
    contiguous row: XLA:CPU otherwise squares the whole tensor into memory and reduces it with
    a strided windowed pass (W1, in-process alternated blocks: median 1.04x inner steps/s)."""
    axes = tuple(a % x.ndim for a in axes)
    kept = [a for a in range(x.ndim) if a not in axes]
    if kept and x.shape[kept[-1]] > 1 and kept != list(range(len(kept))):
        xt = jnp.transpose(x, kept + list(axes))
        ms = jnp.mean(jnp.square(xt), axis=tuple(range(len(kept), x.ndim)))
        return jax.lax.rsqrt(jnp.expand_dims(ms, axes) + eps)
    return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + eps)


def tensor_rms_normalize(x: jax.Array, axes: tuple[int, ...], eps: float = 1e-8) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over ``axes`` (the tensor's own axes): Metz et al. 2019, App. D.1,
    "normalized by the second moment with regard to other elements in the 'batch' dimension"."""
    return x * tensor_rms_scale(x, axes, eps)


def time_features(step: jax.Array, scales: tuple[float, ...], offset: float = 1.0) -> jax.Array:
    """tanh(t / x - offset) for each timescale x: Metz et al. 2019 App. D.1, "tanh(t/eta - 1)",
    also learned_optimization's small_fc_lopt (``tanh_embedding``); offset 0 is the simplified
    tanh(t/x) of PyLO's background page."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.tanh(t / jnp.asarray(scales, jnp.float32) - offset)


def dense_init(key: jax.Array, sizes: tuple[int, ...]) -> list[dict]:
    """LeCun-normal weights, zero biases, for an MLP with layer sizes ``sizes``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros((b,))}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


#: A layer with at most this many inputs multiplies and sums elementwise instead of calling a
#: matmul: XLA:CPU runs a skinny dot (K = 7 features) as a library call plus separate passes
#: for the bias and ReLU, while the elementwise form is one fused loop, measured 4x faster for
#: the mlp optimizer's first layer (scripts/benchmark.py). Same arithmetic up to float rounding.
ELEMENTWISE_FAN_IN = 8
#: Likewise a layer with at most this many outputs (the per-parameter optimizers' output layer,
#: 2 or 3 wide): as a dot it is a skinny library call after a separate pass for the previous
#: layer's bias and ReLU; elementwise, that bias and ReLU fuse into the one multiply-and-sum
#: loop (W1, in-process alternated blocks of 5 outer steps: median 1.14x inner steps/s).
ELEMENTWISE_FAN_OUT = 3


@jax.custom_vjp
def elementwise_dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x @ w + b over the last axis of ``x`` as one fused multiply-and-sum loop (see
    ``ELEMENTWISE_FAN_IN`` and ``ELEMENTWISE_FAN_OUT``). Its gradient is written by hand:
    differentiated as written, the weight gradient sum_n x[n, i] g[n, j] would be a broadcast
    product [N, fan_in, fan_out] in memory reduced by a windowed pass, which was 36% of a TBPTT
    outer step on W1's task (a ``jax.profiler`` trace, 770 of 2,143 ms); here it is one matmul
    over the N rows (tbptt 1.29x, merged 1.25x inner steps/s, in-process alternated blocks)."""
    return jnp.sum(x[..., :, None] * w, axis=-2) + b


def _elementwise_dense_fwd(x, w, b):
    return elementwise_dense(x, w, b), (x, w, b)


def _elementwise_dense_bwd(res, g):
    x, w, b = res
    lead = tuple(range(x.ndim - 1))
    dx = jnp.sum(g[..., None, :] * w, axis=-1)  # g @ w.T, elementwise as the forward
    dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())))  # x.T @ g over every row
    db = jnp.sum(g, axis=lead).reshape(jnp.shape(b))
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(jnp.result_type(b))


elementwise_dense.defvjp(_elementwise_dense_fwd, _elementwise_dense_bwd)


def dense_apply(layers: list[dict], x: jax.Array) -> jax.Array:
    """ReLU MLP applied over the last axis of ``x`` (a batch of per-parameter features)."""
    for i, layer in enumerate(layers):
        w = layer["w"]
        if w.shape[0] <= ELEMENTWISE_FAN_IN or w.shape[1] <= ELEMENTWISE_FAN_OUT:
            x = elementwise_dense(x, w, layer["b"])
        else:
            x = x @ w + layer["b"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def map_leaves(fn, num_outputs: int, updates: Any, *trees: Any) -> tuple[Any, ...]:
    """Apply ``fn(update_leaf, *leaves_of_trees)`` per leaf of ``updates``; unzip the results.

    ``fn`` returns a tuple of ``num_outputs`` values; the result is one tree per value, each with
    the structure of ``updates``. The other trees may hold a subtree (e.g. a dict of
    accumulators) where ``updates`` holds a leaf. Trees without leaves are fine.
    """
    treedef = jax.tree.structure(updates)
    rows = [
        fn(*leaves)
        for leaves in zip(treedef.flatten_up_to(updates), *(treedef.flatten_up_to(t) for t in trees))
    ]
    return tuple(treedef.unflatten([row[i] for row in rows]) for i in range(num_outputs))
