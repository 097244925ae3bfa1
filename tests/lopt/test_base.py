"""lopt/base.py's building blocks against their definitions in numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lopt.base import dense_apply, dense_init, tensor_rms_scale


@pytest.mark.parametrize("shape, axes", [
    ((64, 32, 5), (0, 1)),  # a weight's momenta: the decay axis kept, after the reduced ones
    ((10, 5), (0,)),  # a bias's momenta
    ((3, 7, 1), (0, 1)),  # a gradient with its feature axis of size 1
    ((5, 6, 4), (1,)),  # kept axes on both sides
    ((6, 4), (0, 1)),  # nothing kept
])
def test_tensor_rms_scale_is_the_definition(shape, axes):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 3.0
    want = 1.0 / np.sqrt(np.mean(np.square(x.astype(np.float64)), axis=axes, keepdims=True) + 1e-8)
    got = np.asarray(jax.jit(tensor_rms_scale, static_argnums=1)(x, axes))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("sizes", [(7, 32, 32, 2), (18, 8, 3), (40, 16, 4)])
def test_dense_apply_is_the_relu_mlp(sizes):
    """Elementwise layers (small fan-in or fan-out) and matmul layers compute the same MLP."""
    layers = dense_init(jax.random.PRNGKey(1), sizes)
    x = np.random.default_rng(1).normal(size=(50, sizes[0])).astype(np.float32)
    h = x.astype(np.float64)
    for i, layer in enumerate(layers):
        h = h @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"], np.float64)
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    np.testing.assert_allclose(np.asarray(jax.jit(dense_apply)(layers, x)), h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fan_in, fan_out", [(7, 32), (32, 2)])
def test_elementwise_dense_gradient_is_the_matmul_one(fan_in, fan_out):
    """The hand-written VJP of the elementwise layer equals autodiff of x @ w + b (float32
    rounding: a sum of 3 x 40 products), batched rows, under vmap too."""
    import jax.numpy as jnp

    from lopt.base import elementwise_dense

    rng = np.random.default_rng(2)
    x, w, b = (rng.normal(size=s).astype(np.float32) for s in [(3, 40, fan_in), (fan_in, fan_out), (fan_out,)])
    g = rng.normal(size=(3, 40, fan_out)).astype(np.float32)

    def loss(f):
        return lambda x, w, b: jnp.sum(f(x, w, b) * g)

    want = jax.grad(loss(lambda x, w, b: x @ w + b), argnums=(0, 1, 2))(x, w, b)
    got = jax.jit(jax.grad(loss(elementwise_dense), argnums=(0, 1, 2)))(x, w, b)
    for a, e in zip(got, want):
        assert a.shape == e.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)
    # per-row weights, as under the estimators' vmap over perturbed meta-params
    ws = np.stack([w, 2 * w, -w])
    vg = jax.vmap(lambda xx, ww, gg: jax.grad(lambda q: jnp.sum(elementwise_dense(xx, q, b) * gg))(ww))(x, ws, g)
    vw = jax.vmap(lambda xx, ww, gg: jax.grad(lambda q: jnp.sum((xx @ q + b) * gg))(ww))(x, ws, g)
    np.testing.assert_allclose(np.asarray(vg), np.asarray(vw), rtol=1e-5, atol=1e-5)
