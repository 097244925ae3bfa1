"""Trajectory-length ("horizon") and truncation-length schedules.

A schedule is a static, hashable object called inside jit as ``schedule(key, outer_step)`` and
returning an int32 length. Lengths are data, not shapes: changing them never recompiles the
outer step (the truncation length, which *is* a shape, stays fixed).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from tasks.registry import Registry


class Schedule(Protocol):
    def __call__(self, key: jax.Array, outer_step: jax.Array) -> jax.Array: ...

    @property
    def max_length(self) -> int: ...


REGISTRY: Registry[Schedule] = Registry("length schedule")


@REGISTRY.register("constant")
@dataclasses.dataclass(frozen=True)
class Constant:
    """Every trajectory has ``length`` inner steps."""

    length: int

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"constant schedule: length must be >= 1, got {self.length}")

    def __call__(self, key: jax.Array, outer_step: jax.Array) -> jax.Array:
        del key, outer_step
        return jnp.asarray(self.length, jnp.int32)

    @property
    def max_length(self) -> int:
        return self.length


def constant(length: int) -> Constant:
    return Constant(length)


def get(name: str, **kwargs) -> Schedule:
    return REGISTRY.get(name, **kwargs)
