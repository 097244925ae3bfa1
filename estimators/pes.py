"""``pes``: Persistent Evolution Strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each antithetic pair i keeps the running sum xi_i of the perturbations that shaped its
current inner trajectory. For the truncation with fresh eps_i ~ N(0, s^2 I), the pair's
trajectories unroll with theta + eps_i and theta - eps_i, and (Vicol et al. 2021, eq. 8 / Alg. 2)

    g = 1 / (2 s^2 N) * sum_i  (L(theta + eps_i) - L(theta - eps_i)) * (xi_i + eps_i) .

Here L is the mean over the truncation of the per-step meta-loss terms, and the accumulated
sum is attributed *per step*: a trajectory that ends inside the truncation is credited with
xi_i + eps_i for its steps up to the reset, while the new trajectory after the reset is
credited with eps_i alone (its state owes nothing to earlier perturbations). After the
truncation xi_i becomes xi_i + eps_i, or eps_i if the pair reset mid-truncation, or 0 if it
reset at the truncation's last step (a fresh state has seen no perturbation).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

import estimators
from estimators.base import (
    ESOptions,
    antithetic_params,
    num_pairs,
    pair_keys,
    sample_perturbation,
    split_signs,
    weighted_sum,
)
from estimators.unroll import Unroller, UnrollState
from lopt.base import MetaParams


class PESState(NamedTuple):
    unroll: UnrollState  # 2N interleaved particles: 2i positive, 2i + 1 negative
    accum: MetaParams  # [N, ...] perturbation sums xi_i


@estimators.register("pes")
@dataclasses.dataclass(frozen=True)
class PES(ESOptions):
    """Persistent ES; options ``std``, ``loss_diff_clip``, ``sign`` as in :class:`ESOptions`."""

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> PESState:
        n = num_pairs(unroller, "pes")
        unroll = unroller.init(meta_params, pair_keys(unroller, key))
        accum = jax.tree.map(lambda x: jnp.zeros((n,) + jnp.shape(x), jnp.float32), meta_params)
        return PESState(unroll, accum)

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: PESState, key: jax.Array
    ) -> tuple[MetaParams, PESState, dict]:
        n = num_pairs(unroller, "pes")
        k_eps, k_unroll = jax.random.split(key)
        eps = sample_perturbation(unroller, k_eps, meta_params, self.std)
        unroll, out = unroller.unroll(
            antithetic_params(meta_params, eps),
            state.unroll,
            pair_keys(unroller, k_unroll),
            per_particle_meta_params=True,
        )
        pos, neg = split_signs(out.losses * out.step_weights())  # per-step share of the loss
        diff = pos - neg  # [N, T]
        done = split_signs(out.done)[0]  # partners share tasks and lengths: their masks agree
        before_reset = jnp.cumsum(done, axis=1) - done == 0  # step t belongs to the old trajectory
        coef_eps = self.es_coefficients(diff.sum(axis=1))
        coef_acc = self.es_coefficients(jnp.where(before_reset, diff, 0.0).sum(axis=1))
        grad = jax.tree.map(
            lambda a, b: a + b, weighted_sum(coef_eps, eps), weighted_sum(coef_acc, state.accum)
        )
        any_done = done.any(axis=1)
        last_ran = jnp.argmax(jnp.cumsum(split_signs(out.mask)[0], axis=1), axis=1)  # index of last step run
        reset_at_end = jnp.take_along_axis(done, last_ran[:, None], axis=1)[:, 0]

        def new_sum(acc, e):
            shape = (n,) + (1,) * (acc.ndim - 1)
            fresh = jnp.where(reset_at_end.reshape(shape), 0.0, e)
            return jnp.where(any_done.reshape(shape), fresh, acc + e)

        accum = jax.tree.map(new_sum, state.accum, eps)
        metrics = {
            "meta_loss": out.step_mean().mean(),
            "inner_loss": out.step_mean(out.raw_losses).mean(),
            "inner_steps": out.mask.sum(),
            "trajectories_done": done.sum(),
        }
        return grad, PESState(unroll, accum), metrics
