"""``merged``: reparameterization + ES gradients combined by inverse variance.

Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
optimizers", Sec. 3 and App. C. The meta-objective is smoothed with Gaussian noise on the
meta-params, E_eps[L(theta + eps)], whose gradient has two unbiased estimators. For each
antithetic pair i (theta +- eps_i):

    g_rp,i = d/dtheta (L(theta + eps_i) + L(theta - eps_i)) / 2          (reparameterization)
    g_es,i = (L(theta + eps_i) - L(theta - eps_i)) / 2 * eps_i / s^2      (evolution strategies)

Per element of the meta-params, with empirical means m_rp, m_es and variances v_rp, v_es over
the N pairs, the merged estimate is the minimum-variance combination (eq. 1)

    g = (m_rp * v_es + m_es * v_rp) / (v_rp + v_es) .

When unrolls are long or chaotic the reparameterization gradient explodes and its variance
hands the weight to ES; on smooth short unrolls in many dimensions ES is the noisy one. The
metric ``es_share`` is the mean over elements of v_rp / (v_rp + v_es). As in ``es``, both
members of a pair continue from the positive trajectory's state.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

import estimators
from estimators.base import (
    ESOptions,
    from_pairs,
    keep_positive,
    num_pairs,
    pair_keys,
    pair_mean,
    per_device,
    sample_perturbation,
    to_pairs,
)
from estimators.unroll import Unroller, UnrollState, unroll_metrics
from lopt.base import MetaParams


class MergedState(NamedTuple):
    unroll: UnrollState


def inverse_variance_merge(
    unroller: Unroller, g_rp: jax.Array, g_es: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Metz et al. 2019 eq. 1 per element over the leading (pair) axis, across all shards.

    Returns (merged mean, ES weight w_es = v_rp / (v_rp + v_es)). A non-finite
    reparameterization sample or variance (an exploding unroll) gives that element w_es = 1;
    two zero variances split the weight evenly."""
    n_total = g_rp.shape[0] * unroller.num_shards
    rp_ok = pair_mean(unroller, jnp.isfinite(g_rp).astype(jnp.float32)) == 1.0
    g_rp = jnp.where(rp_ok, g_rp, 0.0)
    m_rp, m_es = pair_mean(unroller, g_rp), pair_mean(unroller, g_es)
    bessel = n_total / (n_total - 1)
    v_rp = pair_mean(unroller, (g_rp - m_rp) ** 2) * bessel
    v_es = pair_mean(unroller, (g_es - m_es) ** 2) * bessel
    ratio = v_es / jnp.where(v_rp > 0, v_rp, 1.0)  # v_es / v_rp; inf v_rp gives 0
    w_es = jnp.where(v_rp > 0, 1.0 / (1.0 + ratio), jnp.where(v_es > 0, 0.0, 0.5))
    w_es = jnp.where(rp_ok & jnp.isfinite(v_rp), w_es, 1.0)
    return (1.0 - w_es) * m_rp + w_es * m_es, w_es


@estimators.register("merged")
@dataclasses.dataclass(frozen=True)
class Merged(ESOptions):
    """Options ``std``, ``loss_diff_clip``, ``sign`` (for the ES half) as in :class:`ESOptions`;
    ``first_order`` and ``checkpoint`` for the reparameterization half as in ``tbptt``."""

    first_order: bool = False
    checkpoint: bool = True

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> MergedState:
        n = num_pairs(unroller, "merged")
        if n * unroller.num_shards < 2:
            raise ValueError("merged needs at least 2 antithetic pairs (num_particles >= 4) "
                             "to estimate variances")
        return MergedState(unroller.init(meta_params, pair_keys(unroller, key)))

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: MergedState, key: jax.Array
    ) -> tuple[MetaParams, MergedState, dict]:
        n = num_pairs(unroller, "merged")
        k_eps, k_unroll = jax.random.split(key)
        eps = sample_perturbation(unroller, k_eps, meta_params, self.std)
        pairs = to_pairs((state.unroll.particles, state.unroll.replay))  # [N, 2, ...]
        keys = pair_keys(unroller, k_unroll)[0::2]
        outer_step = state.unroll.outer_step

        def pair_loss(theta, e, pair, k):
            thetas = jax.tree.map(lambda t, x: jnp.stack([t + x, t - x]), theta, e)
            new, out = unroller.unroll(
                thetas,
                UnrollState(pair[0], outer_step, pair[1]),
                jnp.stack([k, k]),
                per_particle_meta_params=True,
                checkpoint=self.checkpoint,
                stop_inner_grad=self.first_order,
            )
            loss = out.step_mean()  # [2]: L+, L-
            return loss.mean(), ((new.particles, new.replay), loss, out)

        grad_fn = jax.vmap(jax.grad(pair_loss, has_aux=True), in_axes=(None, 0, 0, 0))
        g_rp, (particles, losses, out) = grad_fn(per_device(unroller, meta_params), eps, pairs, keys)
        coef = self.shape_diff(losses[:, 0] - losses[:, 1]) / (2.0 * self.std**2)
        g_es = jax.tree.map(lambda e: coef.reshape((n,) + (1,) * (e.ndim - 1)) * e, eps)

        merged = jax.tree.map(lambda a, b: inverse_variance_merge(unroller, a, b), g_rp, g_es)
        grad = jax.tree.map(lambda m: m[0], merged, is_leaf=lambda x: isinstance(x, tuple))
        w_es = [m[1] for m in jax.tree.leaves(merged, is_leaf=lambda x: isinstance(x, tuple))]
        es_share = jnp.concatenate([w.ravel() for w in w_es]).mean()

        particles, replay = keep_positive(from_pairs(particles))
        unroll = UnrollState(particles, outer_step + 1, replay)
        metrics = {
            "meta_loss": losses.mean(),
            **unroll_metrics(unroller, from_pairs(out), particles, pairs=True),
            "es_share": es_share,
        }
        return grad, MergedState(unroll), metrics
