"""``tbptt``: truncated backpropagation through time.

The gradient of the truncation's mean meta-loss with respect to the meta-params, by reverse
mode through the ``lax.scan`` of inner steps (with chunked ``jax.checkpoint``, so memory
grows as O(sqrt(T)) carries). The particle state carried into the next truncation has its
gradient stopped, which is what makes TBPTT biased towards short-horizon behaviour (Metz et al.
2019 Sec. 2.4; Wu et al. 2018) and what PES corrects.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

import estimators
from estimators.base import per_device, unroll_metrics, unroll_partition
from estimators.unroll import Unroller, UnrollState
from lopt.base import MetaParams


class TBPTTState(NamedTuple):
    unroll: UnrollState


@estimators.register("tbptt")
@dataclasses.dataclass(frozen=True)
class TBPTT:
    """TBPTT; ``first_order`` stops gradients through the optimizee's gradients (the cheap
    approximation of Andrychowicz et al. 2016, Sec. 2.1, used by L2O-DM), otherwise the exact
    second-order meta-gradient; ``checkpoint`` trades compute for O(sqrt(T)) memory."""

    first_order: bool = False
    checkpoint: bool = True

    def unroller(self, unroller: Unroller) -> Unroller:
        """The unroll as TBPTT differentiates it."""
        return dataclasses.replace(unroller, checkpoint=self.checkpoint, first_order=self.first_order)

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> TBPTTState:
        return TBPTTState(unroller.init(meta_params, key))

    def partition(self, state: TBPTTState) -> TBPTTState:
        return TBPTTState(unroll_partition(state.unroll))

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: TBPTTState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, TBPTTState, dict]:
        unroller = self.unroller(unroller)

        def meta_loss(theta):
            unroll, out = unroller.unroll(theta, state.unroll, key, outer_step)
            return out.step_mean().mean(), (unroll, out)

        (loss, (unroll, out)), grad = jax.value_and_grad(meta_loss, has_aux=True)(
            per_device(unroller, meta_params)
        )
        unroll = jax.lax.stop_gradient(unroll)
        metrics = {"meta_loss": loss, **unroll_metrics(unroller, out)}
        return grad, TBPTTState(unroll), metrics
