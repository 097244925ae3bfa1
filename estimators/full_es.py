"""``full_es``: antithetic ES over complete inner trajectories.

Every outer step starts N fresh task pairs, draws one trajectory length L from the horizon
schedule, and trains each task for all L steps with theta + eps_i and theta - eps_i. The
gradient is the antithetic ES estimate of the smoothed full-horizon objective, unbiased by
construction (no truncation; the "full-unroll ES" baseline of Vicol et al. 2021), at the price
of L inner steps per particle per outer step.

Meta-loss (``loss_type``):
  * ``"avg"``: the mean per-step meta-loss term over the trajectory (the Unroller's);
  * ``"last"``: the last step's term;
  * ``"last_recomputed"``: the task loss of the final params on ``num_eval_batches`` fresh
    batches of the Unroller's meta-loss split, normalised and clipped like every term.

Lengths vary without recompiling: the compiled program holds power-of-two buckets of
trajectory length (`lax.switch` on a scalar index) and masks the steps past L.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

import estimators
from estimators import keys as keys_lib
from estimators.base import (
    ESOptions,
    antithetic_params,
    num_pairs,
    sample_perturbation,
    split_signs,
    weighted_sum,
)
from estimators.resets import FreshReset
from estimators.schedules import power_of_two_buckets
from estimators.unroll import Unroller, unroll_metrics
from lopt.base import MetaParams

LOSS_TYPES = ("avg", "last", "last_recomputed")


class FullESState(NamedTuple):
    """Nothing persists between outer steps (every trajectory is fresh and complete)."""


@estimators.register("full_es")
@dataclasses.dataclass(frozen=True)
class FullES(ESOptions):
    loss_type: str = "avg"
    num_eval_batches: int = 4
    min_bucket: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"full_es: loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> FullESState:
        del key, meta_params
        num_pairs(unroller, "full_es")
        if not isinstance(unroller.reset, FreshReset):
            raise ValueError("full_es runs complete fresh trajectories and cannot use a reset "
                             "policy such as the replay buffer; remove unroll.replay or pick "
                             "tbptt, es, pes or merged")
        return FullESState()

    def partition(self, state: FullESState) -> FullESState:
        return state

    def _particle_losses(self, unroller, final, out, keys):
        if self.loss_type == "avg":
            return out.step_mean()
        if self.loss_type == "last":
            last = jnp.argmax(jnp.cumsum(out.mask, axis=1), axis=1)
            return jnp.take_along_axis(out.losses, last[:, None], axis=1)[:, 0]
        task, split = unroller.task_family, unroller.meta_loss.split

        def recomputed(ps, key):
            def one(k):
                return task.loss(ps.spec, ps.params, task.batch(ps.spec, k, split))[0]

            loss = jax.vmap(one)(jax.random.split(key, self.num_eval_batches)).mean()
            return unroller.meta_loss.term(loss, ps.init_loss)

        return jax.vmap(recomputed)(final, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: FullESState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, FullESState, dict]:
        n = num_pairs(unroller, "full_es")
        k_eps, k_len, k_unroll = jax.random.split(key, 3)
        max_length = unroller.horizon.max_length
        length = jnp.clip(unroller.horizon(k_len, outer_step), 1, max_length)
        eps = sample_perturbation(unroller, k_eps, meta_params, self.std)
        thetas = antithetic_params(meta_params, eps)
        keys = keys_lib.pair_keys(k_unroll, unroller.num_particles, unroller.shard_axis)
        buckets = power_of_two_buckets(max_length, min(self.min_bucket, max_length))

        def run(bucket):
            def go(thetas, keys):
                final, out = unroller.trajectory(
                    thetas, keys, length, bucket, outer_step=outer_step,
                    per_particle_meta_params=True,
                )
                return self._particle_losses(unroller, final, out, keys), unroll_metrics(
                    unroller, out, pairs=True
                )

            return go

        index = jnp.searchsorted(jnp.asarray(buckets), length)
        losses, common = jax.lax.switch(index, [run(b) for b in buckets], thetas, keys)
        pos, neg = split_signs(losses)
        grad = weighted_sum(self.es_coefficients(pos - neg), eps)
        metrics = {"meta_loss": losses.mean(), **common, "trajectory_length": length}
        return grad, state, metrics
