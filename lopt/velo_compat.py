"""What VeLO's users get from Google's code besides the update (``lopt/velo.py``): the wrappers
of its ``research/general_lopt/prefab.py`` as optax transformations (``Velo.optimizer``'s
``weight_decay`` and ``max_training_steps``) and its checkpoint layout (``from_google``, which
``lopt-import --arch=velo`` uses)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_NEEDS_LOSS = "velo's update needs the params and the loss: opt.update(grads, state, params, value=loss)"


# -- prefab's wrappers -------------------------------------------------------------------

class AccumulateState(NamedTuple):
    count: jax.Array
    grads: optax.Params
    loss: jax.Array
    inner: optax.OptState


def accumulate(inner: optax.GradientTransformationExtraArgs, k: int) -> optax.GradientTransformationExtraArgs:
    """Every k-th update, ``inner`` on the mean gradient and mean loss of the last k (as
    learned_optimization's ``GradientAccumulator``); zero updates in between."""

    def init_fn(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return AccumulateState(jnp.zeros([], jnp.int32), zeros, jnp.zeros([], jnp.float32),
                               inner.init(params))

    def update_fn(updates, state, params=None, value=None, **extra):
        if value is None:
            raise ValueError(_NEEDS_LOSS)
        grads = jax.tree.map(lambda a, g: a + g, state.grads, updates)
        loss, count = state.loss + value, state.count + 1

        def apply(_):
            mean = jax.tree.map(lambda a: a / k, grads)
            u, s = inner.update(mean, state.inner, params, value=loss / k, **extra)
            return (jax.tree.map(lambda x, g: x.astype(jnp.result_type(g)), u, updates), s,
                    jax.tree.map(jnp.zeros_like, grads), jnp.zeros_like(loss))

        def wait(_):
            return jax.tree.map(jnp.zeros_like, updates), state.inner, grads, loss

        u, s, grads, loss = jax.lax.cond(count % k == 0, apply, wait, None)
        return u, AccumulateState(count, grads, loss, s)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def with_weight_decay(inner: optax.GradientTransformationExtraArgs, weight_decay: float):
    """``inner`` given grads + wd p and loss + wd sum(p^2) (learned_optimization's
    ``WeightDecayWrapper``, as prefab uses it)."""

    def update_fn(updates, state, params=None, value=None, **extra):
        if params is None or value is None:
            raise ValueError(_NEEDS_LOSS)
        value = value + sum(jnp.sum(jnp.square(p)) * weight_decay for p in jax.tree.leaves(params))
        updates = jax.tree.map(lambda g, p: g + weight_decay * p, updates, params)
        return inner.update(updates, state, params, value=value, **extra)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


# -- Google's checkpoint layout ---------------------------------------------------------------

#: Our meta-param path -> the path in learned_optimization's ``HyperV2`` meta-params (the
#: ``params`` of its ``ParameterCheckpoint``); ``mlp_bank/w0/<i>`` is ``w0__<i>`` (by number).
_GOOGLE_NAMES = {
    "lstm_init/hidden": "lstm_init_state/hidden", "lstm_init/cell": "lstm_init_state/cell",
    "mix/first": "rnn_params/linear", "mix/second": "rnn_params/linear_1",
    "mix/input": "rnn_params/linear_2", "lstm": "rnn_params/rnn/linear",
    "controls": "rnn_params/rnn_to_controls", "step_size": "rnn_params/step_size",
    "mlp_bank": "ff_mod_stack/~",
}


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def google_key(path: str) -> str:
    """The Google checkpoint key of one of our meta-param paths (``mix/first/w`` ->
    ``rnn_params/linear/w``; ``mlp_bank/w0/3`` -> ``ff_mod_stack/~/w0__3``)."""
    parts = path.split("/")
    if parts[0] == "mlp_bank":
        leaf = f"w0__{int(parts[2])}" if parts[1] == "w0" else parts[1]
        return f"{_GOOGLE_NAMES['mlp_bank']}/{leaf}"
    for n in (2, 1):
        head = "/".join(parts[:n])
        if head in _GOOGLE_NAMES:
            return "/".join([_GOOGLE_NAMES[head], *parts[n:]])
    raise KeyError(path)


def from_google(learned_opt: Any, google_params: dict) -> dict:
    """Our meta-params from learned_optimization's ``HyperV2`` meta-params (the nested dict of
    its checkpoint's ``params``, as ``flax.serialization.msgpack_restore`` returns it).
    Raises ``ValueError`` (one line) on a missing, unexpected or differently shaped array."""
    theirs = _flat(google_params)
    ref = jax.eval_shape(learned_opt.init, jax.random.PRNGKey(0))
    ours = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(ref)}
    wanted = {google_key(p): p for p in ours}
    extra = sorted(set(theirs) - set(wanted))
    missing = sorted(set(wanted) - set(theirs))
    if extra or missing:
        raise ValueError(f"not the arrays of velo {config_text(learned_opt)}: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")
    values = {}
    for g, p in wanted.items():
        if tuple(theirs[g].shape) != tuple(ours[p].shape):
            raise ValueError(f"{g} has shape {tuple(theirs[g].shape)}, velo "
                             f"{config_text(learned_opt)} needs {tuple(ours[p].shape)}")
        values[p] = jnp.asarray(theirs[g], jnp.float32)
    leaves = [values["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)]
              for path, _ in jax.tree_util.tree_leaves_with_path(ref)]
    return jax.tree.unflatten(jax.tree.structure(ref), leaves)


def config_text(learned_opt: Any) -> str:
    return f"(lstm_hidden_size={learned_opt.lstm_hidden_size}, param_inits={learned_opt.param_inits})"
