"""``full_es``: antithetic ES over complete inner trajectories.

Every outer step starts N fresh task pairs, draws one trajectory length L from the horizon
schedule, and trains each task for all L steps with theta + eps_i and theta - eps_i. The
gradient is the antithetic ES estimate of the smoothed full-horizon objective (the mean
per-step meta-loss term over the trajectory), unbiased by construction (no truncation; the
"full-unroll ES" baseline of Vicol et al. 2021), at the price of L inner steps per particle per
outer step.

A trajectory is one truncation of the unroller's own step loop, as long as the trajectory: the
horizon is the truncation schedule (so lengths vary without recompiling: the compiled program
holds power-of-two buckets of length, ``lax.switch`` on the drawn L, and masks the steps past
it) and every particle's trajectory length is the drawn L.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

import estimators
from estimators.base import (
    ESOptions,
    antithetic,
    antithetic_params,
    check_unroll,
    sample_perturbation,
    split_signs,
    unroll_metrics,
    weighted_sum,
)
from estimators.unroll import Unroller
from lopt.base import MetaParams


class FullESState(NamedTuple):
    """Nothing persists between outer steps (every trajectory is fresh and complete)."""


@estimators.register("full_es")
@dataclasses.dataclass(frozen=True)
class FullES(ESOptions):
    """Option ``std`` as in :class:`ESOptions`."""

    #: Complete fresh trajectories: no reset policy (:func:`check_unroll`).
    fresh_only = True

    def unroller(self, unroller: Unroller) -> Unroller:
        """One truncation per trajectory: the horizon drawn as the truncation length."""
        horizon = unroller.horizon
        return dataclasses.replace(antithetic(unroller), trunc_length=int(horizon.max_length),
                                   trunc_schedule=horizon, stagger=False)

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> FullESState:
        del key, meta_params
        check_unroll(self, unroller)
        return FullESState()

    def partition(self, state: FullESState) -> FullESState:
        return state

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: FullESState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, FullESState, dict]:
        unroller = self.unroller(unroller)
        k_eps, k_init, k_unroll = jax.random.split(key, 3)
        eps = sample_perturbation(unroller, k_eps, meta_params, self.std)
        fresh = unroller.init(meta_params, k_init)
        trunc = unroller.begin(fresh, k_unroll, outer_step)  # its length: the trajectory's L
        particles = fresh.particles._replace(length=jnp.full_like(fresh.particles.length, trunc.n_steps))
        end, _, steps, info, extras = unroller.run(
            antithetic_params(meta_params, eps), particles, trunc, outer_step)
        out = Unroller.output(end, steps, info, extras)
        losses = out.step_mean()
        pos, neg = split_signs(losses)
        grad = weighted_sum(self.es_coefficients(pos - neg), eps)
        metrics = {"meta_loss": losses.mean(), **unroll_metrics(unroller, out),
                   "trajectory_length": trunc.n_steps}
        return grad, state, metrics
