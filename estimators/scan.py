"""Scans over inner steps: a plain ``lax.scan``, and one whose backward pass keeps O(sqrt(T))
carries (backprop through long unrolls, DESIGN.md "Performance rules")."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax


def checkpointed_scan(body: Callable, carry: Any, xs: Any, length: int) -> tuple[Any, Any]:
    """``lax.scan`` whose backward pass stores O(sqrt(T)) carries instead of O(T).

    The T steps run as an outer scan over chunks of ~sqrt(T) steps; each chunk is wrapped in
    ``jax.checkpoint``, so only chunk-boundary carries are saved and a chunk's internals are
    recomputed during backprop (Griewank-style two-level checkpointing).
    """
    chunk = max(d for d in range(1, math.isqrt(length) + 1) if length % d == 0)
    if chunk == 1:
        return jax.lax.scan(jax.checkpoint(body), carry, xs)

    def run_chunk(c, xs_chunk):
        return jax.lax.scan(body, c, xs_chunk)

    xs = jax.tree.map(lambda x: x.reshape((length // chunk, chunk) + x.shape[1:]), xs)
    carry, ys = jax.lax.scan(jax.checkpoint(run_chunk), carry, xs)
    ys = jax.tree.map(lambda y: y.reshape((length,) + y.shape[2:]), ys)
    return carry, ys


def plain_scan(body: Callable, carry: Any, xs: Any, length: int) -> tuple[Any, Any]:
    """``lax.scan`` with :func:`checkpointed_scan`'s signature."""
    del length
    return jax.lax.scan(body, carry, xs)
