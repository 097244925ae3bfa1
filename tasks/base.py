"""The task-family contract (DESIGN.md, "tasks/").

A :class:`TaskFamily` is a static, hashable description of one architecture and data source
with many instances. Everything that varies between instances lives in the ``Spec`` pytree of
arrays returned by ``sample``, so ``jax.vmap`` over specs runs many task instances of one family
in one compiled program.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Array = jax.Array
Spec = Any
Params = Any
Batch = Any

SPLITS = ("train", "valid", "test")


@runtime_checkable
class TaskFamily(Protocol):
    """One inner-problem architecture; instances differ only through their ``Spec``."""

    name: str

    def sample(self, key: Array) -> Spec:
        """Draw a task instance (a pytree of arrays only)."""

    def init(self, spec: Spec, key: Array) -> Params:
        """Initial parameters of the instance ``spec``."""

    def loss(self, spec: Spec, params: Params, batch: Batch) -> tuple[Array, dict]:
        """Scalar loss and auxiliary metrics (e.g. accuracy) on ``batch``."""

    def batch(self, spec: Spec, key: Array, split: str) -> Batch:
        """A batch drawn inside jit from device-resident data; ``split`` in train/valid/test."""


def data_arrays(family: TaskFamily) -> Any:
    """The device arrays a data-backed family reads batches from, or None.

    Closing over a dataset inside ``jax.jit`` embeds it in the program as a constant (seconds
    of compile and a second copy in memory per compile for a CIFAR-sized set). So compiled
    outer loops pass ``data_arrays(family)`` as a jit *argument* and call
    ``bind_data(family, arrays)`` inside, which returns the family reading from those (traced)
    arrays. Families without data need neither method.
    """
    return getattr(family, "arrays", None)


def bind_data(family: TaskFamily, arrays: Any) -> TaskFamily:
    """``family`` reading its batches from ``arrays`` (see :func:`data_arrays`)."""
    return family if arrays is None else family.bind(arrays)


def sample_indices(key: jax.Array, size: int, n: jax.Array | int) -> jax.Array:
    """``size`` indices uniform in [0, n) (with replacement) for a minibatch: one 32-bit draw
    each, reduced modulo n. ``jax.random.randint`` spends a second draw on removing the modulo
    bias, which is at most n / 2^32 relative (2e-4 for a million examples, 3e-7 for 1,437):
    far below minibatch noise, while the second draw costs as much as the first (measured: the
    random-number loops were ~15% of a learned-optimizer inner step on CPU)."""
    bits = jax.random.bits(key, (size,), jnp.uint32)
    return (bits % jnp.asarray(n, jnp.uint32)).astype(jnp.int32)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
