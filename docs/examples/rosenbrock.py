"""A task family of one's own: noisy two-dimensional Rosenbrock functions.

    f(x, y) = (a - x)^2 + b (y - x^2)^2,   a ~ U(0.5, 1.5), b ~ U(1, 10)

Each instance has its own a, b and starting point (its ``Spec``, arrays only); a "batch" is
Gaussian noise on the point, so the gradients are noisy as a minibatch's are. This file is
both the module that registers ``rosenbrock2d`` and a config that meta-trains on it:

    lopt-train --config=docs/examples/rosenbrock.py --workdir=runs/rosenbrock
    lopt-eval --export=runs/rosenbrock/export/optimizer.safetensors --task=rosenbrock2d

(docs/extending.md, "A task").
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

import tasks


@tasks.register("rosenbrock2d")
@dataclasses.dataclass(frozen=True)  # static and hashable: jit takes it as configuration
class Rosenbrock:
    noise: float = 0.1  # a Python float: static, the same for every instance
    name: ClassVar[str] = "rosenbrock2d"

    def sample(self, key):  # the Spec: a pytree of arrays only, so vmap runs many instances
        k_a, k_b, k_start = jax.random.split(key, 3)
        return {"a": jax.random.uniform(k_a, (), minval=0.5, maxval=1.5),
                "b": jax.random.uniform(k_b, (), minval=1.0, maxval=10.0),
                "start": jax.random.uniform(k_start, (2,), minval=-2.0, maxval=2.0)}

    def init(self, spec, key):  # float params
        del key
        return {"xy": spec["start"]}

    def batch(self, spec, key, split):  # drawn inside jit, for "train", "valid" and "test"
        del spec, split
        return {"noise": self.noise * jax.random.normal(key, (2,))}

    def loss(self, spec, params, batch):  # (scalar loss, dict of metrics)
        x, y = params["xy"] + batch["noise"]
        return (spec["a"] - x) ** 2 + spec["b"] * (y - x**2) ** 2, {}


def get_config():
    """The shipped quickstart (PES, the per-parameter MLP optimizer), on this task."""
    from ml_collections import ConfigDict

    from lopt.experiments.inputs import load_config

    c = load_config("quickstart")
    c.task = ConfigDict(dict(name="rosenbrock2d", noise=0.1))
    c.num_outer_steps = 300
    c.unroll.horizon.length = 100
    return c
