"""A gradient estimator of one's own: truncated evolution strategies without antithetic pairs,
with the particles' mean loss as baseline (Salimans et al. 2017, before antithetic sampling):

    g = 1 / (N s^2) * sum_i (L(theta + eps_i) - mean_j L(theta + eps_j)) * eps_i

Each particle unrolls its own perturbed meta-params (``per_particle``) and keeps its own
trajectory from one truncation to the next.

    lopt-train --config=docs/examples/vanilla_es.py --workdir=runs/vanilla_es

(docs/extending.md, "An estimator").
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

import estimators
from estimators import keys
from estimators.base import pair_mean, unroll_metrics, unroll_partition
from estimators.unroll import UnrollState


class VanillaESState(NamedTuple):
    unroll: UnrollState  # the particles (sharded over devices) and the reset policy's state


@estimators.register("vanilla_es")
@dataclasses.dataclass(frozen=True)
class VanillaES:
    std: float = 0.01

    def unroller(self, unroller):  # what this estimator needs of the unroll: fields it sets
        return dataclasses.replace(unroller, per_particle=True)

    def init(self, unroller, key, meta_params):
        return VanillaESState(self.unroller(unroller).init(meta_params, key))

    def partition(self, state):  # True: a leaf with a leading per-particle axis (sharded)
        return VanillaESState(unroll_partition(state.unroll))

    def grad(self, unroller, meta_params, state, key, outer_step):
        unroller = self.unroller(unroller)
        k_eps, k_unroll = jax.random.split(key)
        # One perturbation per particle, keyed by its global index (same draws on any device count).
        particle_keys = keys.particle_keys(k_eps, unroller.num_particles, unroller.shard_axis)
        leaves, treedef = jax.tree.flatten(meta_params)

        def perturbation(k):
            ks = jax.random.split(k, len(leaves))
            return [self.std * jax.random.normal(kk, jnp.shape(x)) for kk, x in zip(ks, leaves)]

        eps = jax.tree.unflatten(treedef, jax.vmap(perturbation)(particle_keys))
        theta = jax.tree.map(lambda t, e: t + e, meta_params, eps)  # [P, ...]
        unroll, out = unroller.unroll(theta, state.unroll, k_unroll, outer_step)
        loss = out.step_mean()  # [P]: each particle's mean meta-loss over the truncation
        advantage = loss - pair_mean(unroller, loss)  # the baseline: every device's mean
        grad = jax.tree.map(
            lambda e: jnp.tensordot(advantage, e, axes=1) / (loss.shape[0] * self.std**2), eps)
        metrics = {"meta_loss": loss.mean(), **unroll_metrics(unroller, out)}
        return grad, VanillaESState(unroll), metrics  # the trainer averages grad over devices


def get_config():
    """The quickstart's optimizer and task, meta-trained with this estimator."""
    from ml_collections import ConfigDict

    from lopt.experiments.inputs import load_config

    c = load_config("quickstart")
    c.task = ConfigDict(dict(name="quadratic", dim=10))
    c.estimator = ConfigDict(dict(name="vanilla_es", std=0.01))
    c.num_outer_steps = 300
    c.unroll.horizon.length = 50
    return c
