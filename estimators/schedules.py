"""Trajectory-length ("horizon") and truncation-length schedules.

A schedule is a static, hashable object called inside jit as ``schedule(key, outer_step)`` and
returning an int32 length. Lengths are data, not shapes: changing them never recompiles the
outer step (the truncation length, which *is* a shape, stays fixed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp

from tasks.registry import Registry


class Schedule(Protocol):
    def __call__(self, key: jax.Array, outer_step: jax.Array) -> jax.Array: ...

    @property
    def max_length(self) -> int: ...

    @property
    def min_length(self) -> int: ...


REGISTRY: Registry[Schedule] = Registry("length schedule")


def power_of_two_buckets(max_length: int, min_bucket: int = 1) -> tuple[int, ...]:
    """Compiled lengths for a varying length <= ``max_length``: powers of two from
    ``min_bucket`` below ``max_length``, then ``max_length`` itself."""
    b, out = min_bucket, []
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


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

    @property
    def min_length(self) -> int:
        return self.length


@REGISTRY.register("linear")
@dataclasses.dataclass(frozen=True)
class Linear:
    """Length growing linearly from ``start`` to ``end`` over ``steps`` outer steps, then flat,
    each draw multiplied by U(1 - jitter, 1 + jitter).

    Metz et al. 2019, Sec. 4.3: "we linearly increase the number of unrolled steps from 50 to
    10,000 over the course of 5,000 outer-training weight updates. The number of unrolled steps
    is additionally jittered by a small percentage (sampled uniformly up to 20%)"; App. C:
    "Sample a number of steps per truncation, k, based on current outer-training iteration".
    It is the *truncation* length there (``unroll.trunc_schedule``); as ``unroll.horizon`` it
    grows whole trajectories instead. The defaults are the paper's: 50 -> 10,000 over 5,000 outer
    steps, jitter 20%."""

    start: int = 50
    end: int = 10_000
    steps: int = 5_000
    jitter: float = 0.2

    def __post_init__(self):
        if not (1 <= self.start and 1 <= self.end and self.steps >= 1):
            raise ValueError(f"linear schedule: need start, end >= 1 and steps >= 1, got {self}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"linear schedule: jitter must lie in [0, 1), got {self.jitter}")

    def mean_length(self, outer_step: jax.Array) -> jax.Array:
        frac = jnp.clip(jnp.asarray(outer_step, jnp.float32) / self.steps, 0.0, 1.0)
        return self.start + (self.end - self.start) * frac

    def __call__(self, key: jax.Array, outer_step: jax.Array) -> jax.Array:
        noise = jax.random.uniform(key, minval=1.0 - self.jitter, maxval=1.0 + self.jitter)
        length = jnp.round(self.mean_length(outer_step) * noise)
        return jnp.clip(length, 1, self.max_length).astype(jnp.int32)

    @property
    def max_length(self) -> int:
        return int(math.ceil(max(self.start, self.end) * (1.0 + self.jitter)))

    @property
    def min_length(self) -> int:
        return max(1, int(math.floor(min(self.start, self.end) * (1.0 - self.jitter))))


@REGISTRY.register("log_uniform")
@dataclasses.dataclass(frozen=True)
class LogUniform:
    """Length log-uniform in [low, high] (a scale-free mix of short and long horizons)."""

    low: int = 10
    high: int = 1000

    def __post_init__(self):
        if not 1 <= self.low <= self.high:
            raise ValueError(f"log_uniform schedule: need 1 <= low <= high, got {self}")

    def __call__(self, key: jax.Array, outer_step: jax.Array) -> jax.Array:
        del outer_step
        u = jax.random.uniform(key, minval=math.log(self.low), maxval=math.log(self.high + 1))
        return jnp.clip(jnp.floor(jnp.exp(u)), self.low, self.high).astype(jnp.int32)

    @property
    def max_length(self) -> int:
        return self.high

    @property
    def min_length(self) -> int:
        return self.low


@REGISTRY.register("stages")
@dataclasses.dataclass(frozen=True)
class Stages:
    """Piecewise-constant lengths: ``lengths[i]`` from outer step ``boundaries[i-1]`` on
    (e.g. Chen et al. 2020's 100, 200, 500, 1000 curriculum run on a fixed timetable)."""

    lengths: tuple[int, ...] = (100, 200, 500, 1000)
    boundaries: tuple[int, ...] = (1000, 2000, 3000)

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(int(x) for x in self.lengths))
        object.__setattr__(self, "boundaries", tuple(int(x) for x in self.boundaries))
        if len(self.boundaries) != len(self.lengths) - 1:
            raise ValueError(
                f"stages schedule: {len(self.lengths)} lengths need {len(self.lengths) - 1} "
                f"boundaries, got {len(self.boundaries)}"
            )
        if list(self.boundaries) != sorted(self.boundaries) or min(self.lengths) < 1:
            raise ValueError("stages schedule: boundaries must increase and lengths be >= 1")

    def __call__(self, key: jax.Array, outer_step: jax.Array) -> jax.Array:
        del key
        stage = jnp.searchsorted(jnp.asarray(self.boundaries), outer_step, side="right")
        return jnp.asarray(self.lengths, jnp.int32)[stage]

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def min_length(self) -> int:
        return min(self.lengths)


def constant(length: int) -> Constant:
    return Constant(length)


def linear(start: int = 50, end: int = 10_000, steps: int = 5_000, jitter: float = 0.2) -> Linear:
    return Linear(start, end, steps, jitter)


def get(name: str, **kwargs) -> Schedule:
    return REGISTRY.get(name, **kwargs)
