"""tasks.models: the CPU convolution gradient equals JAX's own; initialisers' statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tasks import models


def test_cpu_conv_gradient_matches_lax():
    cases = [(8, 3, 1), (7, 3, 2), (9, 5, 2), (6, 5, 1), (8, 1, 2), (5, 1, 1)]  # size, kernel, stride
    rng = np.random.default_rng(0)
    inputs = []
    for size, kernel, stride in cases:
        x = rng.normal(size=(2, size, size + 1, 3)).astype(np.float32)
        w = rng.normal(size=(kernel, kernel, 3, 4)).astype(np.float32)
        out = (2, -(-size // stride), -(-(size + 1) // stride), 4)
        inputs.append((x, w, rng.normal(size=out).astype(np.float32)))

    @jax.jit
    def both(inputs):  # one compile for every case
        out = []
        for (x, w, dy), (_, _, stride) in zip(inputs, cases):
            lax_y, lax_vjp = jax.vjp(lambda x, w: models._lax_conv(x, w, stride), x, w)  # noqa: B023
            cpu_y, cpu_vjp = jax.vjp(lambda x, w: models._cpu_conv(x, w, stride), x, w)  # noqa: B023
            out.append(((lax_y, *lax_vjp(dy)), (cpu_y, *cpu_vjp(dy))))
        return out

    for want, got in both(inputs):
        for a, b in zip(got, want):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_initialisers():
    key = jax.random.PRNGKey(0)
    shape = (3, 3, 64, 128)  # fan_in 576, fan_out 1152
    for init, std in [
        (models.lecun_normal, (1 / 576) ** 0.5),
        (models.he_normal, (2 / 576) ** 0.5),
        (models.glorot_uniform, (2 / (576 + 1152)) ** 0.5),
        (models.normal(0.02), 0.02),
    ]:
        w = init(key, shape)
        assert w.shape == shape and w.dtype == jnp.float32
        assert abs(float(w.std()) / std - 1) < 0.02, init
        assert abs(float(w.mean())) < 0.05 * std
    assert float(jnp.abs(models.lecun_normal(key, (100, 100))).max()) <= 2 * 0.1 / 0.8796 + 1e-6


def test_max_pool_matches_flax():
    import flax.linen as nn

    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)
    want = nn.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(models.max_pool_2x2(jnp.asarray(x)), want)
    assert want.shape == (2, 3, 3, 3)
