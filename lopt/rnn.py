"""Coordinate-wise recurrent learned optimizers: ``lstm_dm`` (L2O-DM) and ``rnnprop``.

Both run one small LSTM stack per scalar parameter ("coordinate-wise", Andrychowicz et al.
2016, Sec. 2.1): the LSTM weights (the meta-params) are shared by every coordinate of every
tensor, and each coordinate carries its own hidden and cell state in the optax state. Since
nothing in these optimizers looks across a tensor, the coordinates of all leaves are processed
as one flat batch: ``h`` and ``c`` have shape ``(num_slots, num_layers, hidden_size)``, slot
``i`` holding coordinate ``i`` of the leaves raveled and concatenated in ``jax.tree.leaves``
order. One LSTM stack serves the whole pytree, which keeps compile time independent of the
number of leaves. Above ``CHUNK_SIZE`` coordinates the LSTM runs over equal chunks in sequence
(``lax.map``), bounding its temporaries; ``num_slots`` then exceeds the number of coordinates by
fewer than the number of chunks (padding slots that see zero gradients). The cells are
plain ``jnp`` functions over the last axis, so the optimizers work under ``jit`` and ``vmap``
and their state is an ordinary pytree of arrays that orbax checkpoints.

The LSTM cell (Hochreiter & Schmidhuber 1997, with forget gate, Gers et al. 2000), gates in
the order input, forget, candidate, output:

    [i, f, u, o] = x W_x + h W_h + b
    c' = sigmoid(f + forget_bias) * c + sigmoid(i) * tanh(u)
    h' = sigmoid(o) * tanh(c')
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lopt


# --- plain-jnp building blocks ----------------------------------------------------------------


def lstm_init(key: jax.Array, input_size: int, hidden_size: int) -> dict:
    """LeCun-normal input and recurrent weights, zero bias, for :func:`lstm_step`."""
    k_x, k_h = jax.random.split(key)
    return {
        "w_x": jax.random.normal(k_x, (input_size, 4 * hidden_size)) / jnp.sqrt(input_size),
        "w_h": jax.random.normal(k_h, (hidden_size, 4 * hidden_size)) / jnp.sqrt(hidden_size),
        "b": jnp.zeros((4 * hidden_size,)),
    }


def lstm_step(
    cell: dict, x: jax.Array, h: jax.Array, c: jax.Array, forget_bias: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """One LSTM step over the last axis (module docstring); any leading batch shape."""
    gates = x @ cell["w_x"] + h @ cell["w_h"] + cell["b"]
    i, f, u, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f + forget_bias) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


def lstm_stack(
    cells: list[dict], x: jax.Array, h: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run stacked cells; ``h``, ``c``: [..., num_layers, hidden]. Returns (top h, new h, new c)."""
    hs, cs = [], []
    for layer, cell in enumerate(cells):
        x, c_l = lstm_step(cell, x, h[..., layer, :], c[..., layer, :])
        hs.append(x)
        cs.append(c_l)
    return x, jnp.stack(hs, axis=-2), jnp.stack(cs, axis=-2)


def linear_init(key: jax.Array, input_size: int, output_size: int) -> dict:
    return {
        "w": jax.random.normal(key, (input_size, output_size)) / jnp.sqrt(input_size),
        "b": jnp.zeros((output_size,)),
    }


def log_and_sign(g: jax.Array, k: float) -> jax.Array:
    """Andrychowicz et al. 2016, App. A gradient preprocessing, as [..., 2]:

        (log|g| / k, sign(g))   if |g| >= e^-k
        (-1, e^k g)             otherwise

    written as (clip(log|g| / k, min=-1), clip(e^k g, -1, 1)), which is the same map.
    """
    log = jnp.log(jnp.abs(g) + 1e-30) / k
    return jnp.stack([jnp.maximum(log, -1.0), jnp.clip(g * jnp.exp(k), -1.0, 1.0)], axis=-1)


def num_coordinates(params) -> int:
    """Number of scalar parameters in ``params``."""
    return sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))


def flatten_coordinates(tree) -> jax.Array:
    """All leaves raveled, cast to float32 and concatenated: shape (num_coordinates,)."""
    leaves = [jnp.ravel(jnp.asarray(x, jnp.float32)) for x in jax.tree.leaves(tree)]
    return jnp.concatenate(leaves) if leaves else jnp.zeros((0,), jnp.float32)


def unflatten_coordinates(flat: jax.Array, like):
    """Split ``flat`` back into ``like``'s leaves, each reshaped and cast to that leaf's dtype."""
    leaves, treedef = jax.tree.flatten(like)
    out, start = [], 0
    for leaf in leaves:
        size = int(np.prod(jnp.shape(leaf)))
        out.append(flat[start : start + size].reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf)))
        start += size
    return treedef.unflatten(out)


# Coordinates are processed in chunks of at most this many, one after another (``lax.map``), so
# the LSTM's temporaries (~300 floats per coordinate) stay bounded for large models; the state
# then holds one slot per coordinate plus fewer than ``num_chunks`` padding slots.
CHUNK_SIZE = 1 << 16


def chunk_layout(n: int, chunk_size: int | None = None) -> tuple[int, int]:
    """(number of chunks, chunk length) for ``n`` coordinates: one chunk of ``n`` up to
    ``chunk_size`` (default ``CHUNK_SIZE``), else ``ceil(n / chunk_size)`` equal chunks covering
    ``n`` with < 1 padding slot per chunk."""
    chunk_size = chunk_size or CHUNK_SIZE
    if n <= chunk_size:
        return 1, n
    k = -(-n // chunk_size)
    return k, -(-n // k)


def num_slots(params) -> int:
    """Length of the recurrent optimizers' state arrays for ``params`` (>= num_coordinates)."""
    k, c = chunk_layout(num_coordinates(params))
    return k * c


def _chunked(fn, layout: tuple[int, int], *arrays):
    """``fn(*arrays)`` evaluated chunk by chunk along the leading (slot) axis."""
    k, c = layout
    if k == 1:
        return fn(*arrays)
    xs = tuple(a.reshape((k, c) + a.shape[1:]) for a in arrays)
    ys = jax.lax.map(lambda t: fn(*t), xs)
    return jax.tree.map(lambda y: y.reshape((k * c,) + y.shape[2:]), ys)


def _flat_grads(updates, state_slots: int, name: str) -> tuple[jax.Array, tuple[int, int], int]:
    """Gradients as a zero-padded (slots,) float32 vector, the chunk layout and the count."""
    n = num_coordinates(updates)
    layout = chunk_layout(n)
    slots = layout[0] * layout[1]
    if state_slots != slots:
        raise ValueError(
            f"{name}: the optimizer state has {state_slots} coordinate slots but these updates "
            f"need {slots} ({n} coordinates); was the state initialised for other params?"
        )
    g = flatten_coordinates(updates)
    return (jnp.pad(g, (0, slots - n)) if slots > n else g), layout, n


def _zeros_state(params, num_layers: int, hidden_size: int) -> jax.Array:
    return jnp.zeros((num_slots(params), num_layers, hidden_size), jnp.float32)


# --- L2O-DM -----------------------------------------------------------------------------------


class LSTMState(NamedTuple):
    h: jax.Array  # (num_slots, num_layers, hidden_size) float32 hidden states
    c: jax.Array  # (num_slots, num_layers, hidden_size) float32 cell states


@lopt.register("lstm_dm")
@dataclasses.dataclass(frozen=True)
class LSTMDM:
    """The coordinate-wise LSTM optimizer of Andrychowicz et al. 2016 ("L2O-DM").

    M. Andrychowicz, M. Denil, S. Gomez, M. W. Hoffman, D. Pfau, T. Schaul, B. Shillingford,
    N. de Freitas, "Learning to learn by gradient descent by gradient descent", NeurIPS 2016:
    the update ``theta_{t+1} = theta_t + g_t`` (Eq. 1) with ``[g_t, h_{t+1}] = m(grad_t, h_t,
    phi)``, m an LSTM (Sec. 2), applied coordinate-wise with shared weights (Sec. 2.1), on
    LogAndSign-preprocessed gradients (App. A). The L2O-DM baseline of T. Chen, W. Zhang, J. Zhou,
    S. Chang, S. Liu, L. Amini, Z. Wang, "Training stronger baselines for learning to optimize",
    NeurIPS 2020 (Sec. 5, "Optimizer Settings": "the earliest and simplest L2O-DM introduced by
    DeepMind [1]") is this network as DeepMind's released L2O-DM code configures it
    (github.com/deepmind/learning-to-learn, ``util.get_default_net_config``), which Chen et
    al.'s code builds on: two LSTM layers of 20 units (also Andrychowicz et al., Sec. 3),
    LogAndSign with k = 5 and a linear output scaled by 0.01 (``update = 0.01 * (h_top W + b)``).
    k = 5 and the 0.01 scale are the released code's defaults; Chen et al. do not print them.
    """

    hidden_size: int = 20
    num_layers: int = 2
    preprocess_k: float = 5.0
    output_scale: float = 0.01
    name: ClassVar[str] = "lstm_dm"

    def __post_init__(self):
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("lstm_dm: hidden_size and num_layers must be >= 1")
        if not self.preprocess_k > 0:
            raise ValueError(f"lstm_dm: preprocess_k must be positive, got {self.preprocess_k}")

    def init(self, key: jax.Array) -> dict:
        keys = jax.random.split(key, self.num_layers + 1)
        sizes = [2] + [self.hidden_size] * self.num_layers
        return {
            "lstm": [lstm_init(k, a, self.hidden_size) for k, a in zip(keys[:-1], sizes[:-1])],
            "out": linear_init(keys[-1], self.hidden_size, 1),
        }

    def optimizer(self, meta_params: dict) -> optax.GradientTransformationExtraArgs:
        def init_fn(params):
            zeros = _zeros_state(params, self.num_layers, self.hidden_size)
            return LSTMState(h=zeros, c=jnp.zeros_like(zeros))

        def coordinatewise(g, h, c):
            x = log_and_sign(g, self.preprocess_k)
            top, h, c = lstm_stack(meta_params["lstm"], x, h, c)
            out = top @ meta_params["out"]["w"] + meta_params["out"]["b"]
            return self.output_scale * out[:, 0], h, c

        def update_fn(updates, state, params=None, **extra_args):
            del params, extra_args
            g, layout, n = _flat_grads(updates, state.h.shape[0], self.name)
            step, h, c = _chunked(coordinatewise, layout, g, state.h, state.c)
            return unflatten_coordinates(step[:n], updates), LSTMState(h=h, c=c)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- RNNprop ----------------------------------------------------------------------------------


class RNNPropState(NamedTuple):
    h: jax.Array  # (num_slots, num_layers, hidden_size) float32 hidden states
    c: jax.Array  # (num_slots, num_layers, hidden_size) float32 cell states
    mu: jax.Array  # (num_slots,) float32 Adam first moment
    nu: jax.Array  # (num_slots,) float32 Adam second moment
    count: jax.Array  # int32 scalar: updates taken so far


@lopt.register("rnnprop")
@dataclasses.dataclass(frozen=True)
class RNNProp:
    """RNNprop: K. Lv, S. Jiang, J. Li, "Learning gradient descent: better generalization and
    longer horizons", ICML 2017 (configured as the baseline of Chen et al. 2020).

    Inputs (Lv et al.'s preprocessing): Adam's bias-corrected moments (beta1 = beta2 = 0.95)

        m_t = b1 m + (1 - b1) g,  v_t = b2 v + (1 - b2) g^2,
        m_hat = m_t / (1 - b1^t),  v_hat = v_t / (1 - b2^t)

    give ``m_hat / (sqrt(v_hat + eps_root) + eps)`` and ``g / (sqrt(v_hat + eps_root) + eps)``,
    which are invariant to the gradient's scale. ``eps_root`` (1e-16, not in Lv et al.) keeps the
    derivative of the square root finite where v = 0 (a coordinate whose gradient has been
    exactly zero), so second-order meta-gradients through this preprocessing stay finite. Network: a linear layer of 20 with ELU, two coordinate-wise LSTM
    layers of 20, and a linear output squashed by tanh:

        update = learning_rate * output_scale * tanh(h_top W + b)

    so one step never exceeds ``learning_rate * output_scale`` per coordinate.
    """

    hidden_size: int = 20
    num_layers: int = 2
    beta1: float = 0.95
    beta2: float = 0.95
    eps: float = 1e-8
    eps_root: float = 1e-16
    output_scale: float = 0.01
    learning_rate: float = 1.0
    name: ClassVar[str] = "rnnprop"

    def __post_init__(self):
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("rnnprop: hidden_size and num_layers must be >= 1")
        for nm in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, nm) < 1.0:
                raise ValueError(f"rnnprop: {nm} must lie in [0, 1), got {getattr(self, nm)}")

    def init(self, key: jax.Array) -> dict:
        keys = jax.random.split(key, self.num_layers + 2)
        return {
            "input": linear_init(keys[0], 2, self.hidden_size),
            "lstm": [lstm_init(k, self.hidden_size, self.hidden_size) for k in keys[1:-1]],
            "out": linear_init(keys[-1], self.hidden_size, 1),
        }

    def optimizer(self, meta_params: dict) -> optax.GradientTransformationExtraArgs:
        b1, b2, eps, eps_root = self.beta1, self.beta2, self.eps, self.eps_root
        scale = self.learning_rate * self.output_scale

        def init_fn(params):
            zeros = _zeros_state(params, self.num_layers, self.hidden_size)
            moment = jnp.zeros((zeros.shape[0],), jnp.float32)
            return RNNPropState(
                h=zeros,
                c=jnp.zeros_like(zeros),
                mu=moment,
                nu=jnp.zeros_like(moment),
                count=jnp.zeros([], jnp.int32),
            )

        def update_fn(updates, state, params=None, **extra_args):
            del params, extra_args
            g, layout, n = _flat_grads(updates, state.h.shape[0], self.name)
            count = optax.safe_increment(state.count)
            t = count.astype(jnp.float32)
            c1 = 1.0 - jnp.float32(b1) ** t
            c2 = 1.0 - jnp.float32(b2) ** t

            def coordinatewise(g, h, c, mu, nu):
                # Lv et al. 2017: Adam's bias-corrected moments normalise the inputs.
                mu = b1 * mu + (1.0 - b1) * g
                nu = b2 * nu + (1.0 - b2) * jnp.square(g)
                denom = jnp.sqrt(nu / c2 + eps_root) + eps
                x = jnp.stack([(mu / c1) / denom, g / denom], axis=-1)
                x = jax.nn.elu(x @ meta_params["input"]["w"] + meta_params["input"]["b"])
                top, h, c = lstm_stack(meta_params["lstm"], x, h, c)
                out = jnp.tanh(top @ meta_params["out"]["w"] + meta_params["out"]["b"])[:, 0]
                return scale * out, h, c, mu, nu

            step, h, c, mu, nu = _chunked(
                coordinatewise, layout, g, state.h, state.c, state.mu, state.nu
            )
            new_updates = unflatten_coordinates(step[:n], updates)
            return new_updates, RNNPropState(h=h, c=c, mu=mu, nu=nu, count=count)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
