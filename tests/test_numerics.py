"""The installed XLA computes what the estimators rely on.

jaxlib 0.10.2 miscompiles, on CPU, a reduction feeding a dot whose other operand is a broadcast
scalar (a YNNPACK fusion reads the broadcast operand as if it were dense): ``x.sum(-1) @ ones``
comes back wrong, and against ``zeros`` it returns whatever memory held, different from process
to process. PES's first truncation has exactly that shape (its perturbation sums start at 0),
which silently corrupted meta-gradients; pyproject.toml excludes the version and
``estimators.base.weighted_sum`` avoids the pattern. This test fails on an XLA with the bug.
"""

import jax
import jax.numpy as jnp
import numpy as np


def test_reduce_then_dot_against_a_broadcast_scalar():
    x = jax.random.normal(jax.random.PRNGKey(0), (400, 48, 4))
    s = np.asarray(x, np.float64).sum(-1)
    for n in (4096, 65536, 76800):  # leave non-zero bits in freed memory, as a real run does
        jax.random.bits(jax.random.PRNGKey(n), (n,)).block_until_ready()
    ones = jax.jit(lambda x: x.sum(-1) @ jnp.ones((48, 3), jnp.float32))(x)
    zeros = jax.jit(lambda x: x.sum(-1) @ jnp.zeros((48, 3), jnp.float32))(x)
    np.testing.assert_allclose(np.asarray(ones), np.repeat(s.sum(1, keepdims=True), 3, 1), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(zeros), 0.0)
