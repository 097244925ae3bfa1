"""``es``: truncated antithetic evolution strategies.

Each truncation draws fresh eps_i ~ N(0, s^2 I) per pair, unrolls theta + eps_i and
theta - eps_i from the pair's shared state, and estimates (Salimans et al. 2017; Vicol et al.
2021 eq. 3)

    g = 1 / (2 s^2 N) * sum_i (L(theta + eps_i) - L(theta - eps_i)) * eps_i .

The gradient ignores how the carried state depends on theta, so like TBPTT it is biased
towards the truncation's short horizon (PES removes that bias). After the truncation both
members of a pair continue from the *positive* trajectory's state, so partners always start a
truncation from the same state and the difference L+ - L- measures eps_i alone.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

import estimators
from estimators.base import (
    ESOptions,
    antithetic,
    antithetic_unroll,
    check_unroll,
    keep_positive,
    split_signs,
    unroll_metrics,
    unroll_partition,
    weighted_sum,
)
from estimators.unroll import Unroller, UnrollState
from lopt.base import MetaParams


class ESState(NamedTuple):
    unroll: UnrollState  # 2N interleaved particles (partners equal at truncation start)


@estimators.register("es")
@dataclasses.dataclass(frozen=True)
class TruncatedES(ESOptions):
    """Option ``std`` as in :class:`ESOptions`."""

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> ESState:
        check_unroll(self, unroller)
        return ESState(antithetic(unroller).init(meta_params, key))

    def partition(self, state: ESState) -> ESState:
        return ESState(unroll_partition(state.unroll))

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: ESState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, ESState, dict]:
        unroller = antithetic(unroller)
        eps, unroll, out = antithetic_unroll(unroller, meta_params, state.unroll, key, self.std, outer_step)
        loss = out.step_mean()
        pos, neg = split_signs(loss)
        grad = weighted_sum(self.es_coefficients(pos - neg), eps)
        unroll = unroll._replace(particles=keep_positive(unroll.particles))
        metrics = {"meta_loss": loss.mean(), **unroll_metrics(unroller, out)}
        return grad, ESState(unroll), metrics
