"""``pes``: Persistent Evolution Strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each antithetic pair i keeps the running sum xi_i of the perturbations that shaped its
current inner trajectory. For the truncation with fresh eps_i ~ N(0, s^2 I), the pair's
trajectories unroll with theta + eps_i and theta - eps_i, and (Vicol et al. 2021, eq. 8 / Alg. 2)

    g = 1 / (2 s^2 N) * sum_i  (L(theta + eps_i) - L(theta - eps_i)) * (xi_i + eps_i) ,
    xi_i <- xi_i + eps_i .

Here L is the mean over the truncation of the per-step meta-loss terms, and the sum is
attributed *per step*: a step of the trajectory the pair carried into the truncation is
credited with xi_i + eps_i; a step of a trajectory that started in this truncation (fresh, or
restored by the reset policy) with eps_i alone, since that state owes nothing to earlier
perturbations. After the truncation xi_i is xi_i + eps_i if the pair kept its trajectory
throughout, else eps_i (the sum of its newest trajectory).

PES refuses a reset policy that starts every segment anew (``segment_reset``: ELO's replay
buffer, ``estimators.resets.ELOReplay``). There every segment starts restored or fresh, so every
pair's sum would restart at zero each truncation and the estimate would be exactly truncated ES
(``es``: the same gradients up to float rounding on the same keys and states): a restored state
was shaped by older meta-params whose perturbations no pair holds, and PES's unbiasedness holds
across the truncations of one trajectory, which the buffer replaces by chains of segments. A
config that names ``pes`` with ``unroll.replay`` would compute truncated ES under PES's name,
so it is an error that says so.
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
    antithetic_unroll,
    check_unroll,
    split_signs,
    unroll_metrics,
    unroll_partition,
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
    """Persistent ES; option ``std`` as in :class:`ESOptions`."""

    #: Needs trajectories that continue across truncations (refuses the replay buffer).
    persistent = True

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> PESState:
        check_unroll(self, unroller)
        n = unroller.num_particles // 2
        unroll = antithetic(unroller).init(meta_params, key)
        accum = jax.tree.map(lambda x: jnp.zeros((n,) + jnp.shape(x), jnp.float32), meta_params)
        return PESState(unroll, accum)

    def partition(self, state: PESState) -> PESState:
        return PESState(unroll_partition(state.unroll), jax.tree.map(lambda _: True, state.accum))

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: PESState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, PESState, dict]:
        n = unroller.num_particles // 2
        unroller = antithetic(unroller)
        eps, unroll, out = antithetic_unroll(unroller, meta_params, state.unroll, key, self.std, outer_step)
        pos, neg = split_signs(out.losses * out.step_weights())  # per-step share of the loss
        diff = pos - neg  # [N, T]
        reset = split_signs(out.reset)[0]  # partners share keys: their resets agree
        carried = jnp.cumsum(reset, axis=1) == 0  # step t belongs to the carried trajectory
        coef_eps = self.es_coefficients(diff.sum(axis=1))
        coef_acc = self.es_coefficients(jnp.where(carried, diff, 0.0).sum(axis=1))
        grad = jax.tree.map(
            lambda a, b: a + b, weighted_sum(coef_eps, eps), weighted_sum(coef_acc, state.accum)
        )
        kept = ~reset.any(axis=1)

        def new_sum(acc, e):
            return jnp.where(kept.reshape((n,) + (1,) * (acc.ndim - 1)), acc + e, e)

        accum = jax.tree.map(new_sum, state.accum, eps)
        metrics = {"meta_loss": out.step_mean().mean(), **unroll_metrics(unroller, out)}
        return grad, PESState(unroll, accum), metrics
