"""``merged``: reparameterization + ES gradients combined by inverse variance.

Metz et al. 2019, "Understanding and correcting pathologies in the training of learned
optimizers", Sec. 3 and App. C. The meta-objective is smoothed with Gaussian noise on the
meta-params, E_eps[L(theta + eps)], whose gradient has two unbiased estimators; App. C, per
antithetic pair i (theta +- eps_i):

    "Compute a single sample of g_rp = grad_theta 1/2 (L+ + L-)"                (reparameterization)
    "Compute a single sample of g_es = 1/2 (L+ - L-) grad_theta log N(e; theta, sigma^2 I)"
        = (L(theta + eps_i) - L(theta - eps_i)) / 2 * eps_i / sigma^2             (ES)

and "compute empirical variance and empirical mean of each weight for each estimator. Use
equation 1 to compute the combined gradient estimate": per element, with empirical means m_rp,
m_es and variances v_rp, v_es over the pairs (eq. 1, inverse-variance weighting)

    g = (m_rp / v_rp + m_es / v_es) / (1 / v_rp + 1 / v_es) = (m_rp v_es + m_es v_rp) / (v_rp + v_es).

"In practice we found good performance using the same samples for both" (the means and the
variances). When unrolls are long or chaotic the reparameterization gradient explodes and its
variance hands the weight to ES; on smooth short unrolls in many dimensions ES is the noisy
one. The metric ``es_share`` is the mean over elements of v_rp / (v_rp + v_es). As in ``es``
(App. C: "Assign the current inner-parameter w from one of the two sequences"), both members of
a pair continue from the positive trajectory's state.

A non-finite reparameterization sample gives its element an ES weight of 1: counted, per outer
step, as ``rp_nonfinite_share`` (the share of elements where it happened), so a run that falls
back to pure ES says so. ``rp_variance`` and ``es_variance`` are the two variances eq. 1 weighs
by, each the mean over elements of one pair's per-element variance; the reparameterization mean
skips the non-finite elements. They are what Sec. 3's Figure 4 plots: "As outer-training
progresses, the variance of the reparameterization gradient estimator grows, while the variance
of the ES estimator remains constant" ("the variances of g_es and g_rp can differ by as many as
20 orders of magnitude"). The paper does not say how a vector's variance is reduced to one
number; the mean over elements is ours (tests/estimators/test_statistics.py pins it: with one
meta-param the ES weight is exactly rp_variance / (rp_variance + es_variance)).
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
    check_unroll,
    from_pairs,
    keep_positive,
    pair_mean,
    per_device,
    sample_perturbation,
    to_pairs,
    unroll_metrics,
    unroll_partition,
)
from estimators.unroll import Truncation, Unroller, UnrollState
from lopt.base import MetaParams


class MergedState(NamedTuple):
    unroll: UnrollState


def inverse_variance_merge(
    unroller: Unroller, g_rp: jax.Array, g_es: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Metz et al. 2019 eq. 1 per element over the leading (pair) axis, across all shards.

    Returns (merged mean, ES weight w_es = v_rp / (v_rp + v_es), rp non-finite flag, v_rp,
    v_es): the last two are the per-element variances of one pair's estimate (Bessel-corrected,
    across all shards) that eq. 1 weighs by. A non-finite reparameterization sample or variance
    (an exploding unroll) gives that element w_es = 1; two zero variances split the weight
    evenly."""
    n_total = g_rp.shape[0] * unroller.num_shards
    rp_ok = pair_mean(unroller, jnp.isfinite(g_rp).astype(jnp.float32)) == 1.0
    g_rp = jnp.where(rp_ok, g_rp, 0.0)
    m_rp, m_es = pair_mean(unroller, g_rp), pair_mean(unroller, g_es)
    bessel = n_total / (n_total - 1)
    v_rp = pair_mean(unroller, (g_rp - m_rp) ** 2) * bessel
    v_es = pair_mean(unroller, (g_es - m_es) ** 2) * bessel
    ratio = v_es / jnp.where(v_rp > 0, v_rp, 1.0)  # v_es / v_rp; inf v_rp gives 0
    w_es = jnp.where(v_rp > 0, 1.0 / (1.0 + ratio), jnp.where(v_es > 0, 0.0, 0.5))
    bad = ~(rp_ok & jnp.isfinite(v_rp))
    w_es = jnp.where(bad, 1.0, w_es)
    return (1.0 - w_es) * m_rp + w_es * m_es, w_es, bad, v_rp, v_es


@estimators.register("merged")
@dataclasses.dataclass(frozen=True)
class Merged(ESOptions):
    """Option ``std`` (for the ES half) as in :class:`ESOptions`;
    ``first_order`` and ``checkpoint`` for the reparameterization half as in ``tbptt``."""

    first_order: bool = False
    checkpoint: bool = True

    #: eq. 1's per-element variances need at least two pairs (:func:`check_unroll`).
    min_pairs = 2

    def unroller(self, unroller: Unroller) -> Unroller:
        """Antithetic pairs, each pair's run mapped by ``vmap`` (``vmapped``) and differentiated
        as TBPTT differentiates (``checkpoint``, ``first_order``)."""
        return dataclasses.replace(antithetic(unroller), vmapped=True, checkpoint=self.checkpoint,
                                   first_order=self.first_order)

    def init(self, unroller: Unroller, key: jax.Array, meta_params: MetaParams) -> MergedState:
        check_unroll(self, unroller)
        return MergedState(self.unroller(unroller).init(meta_params, key))

    def partition(self, state: MergedState) -> MergedState:
        return MergedState(unroll_partition(state.unroll))

    def grad(
        self, unroller: Unroller, meta_params: MetaParams, state: MergedState, key: jax.Array,
        outer_step: jax.Array,
    ) -> tuple[MetaParams, MergedState, dict]:
        n = unroller.num_particles // 2
        unroller = self.unroller(unroller)
        k_eps, k_unroll = jax.random.split(key)
        eps = sample_perturbation(unroller, k_eps, meta_params, self.std)
        trunc = unroller.begin(state.unroll, k_unroll, outer_step)
        pairs = to_pairs((state.unroll.particles, trunc.start))  # [N, 2, ...]

        def pair_loss(theta, e, pair):
            particles, start = pair
            thetas = jax.tree.map(lambda t, x: jnp.stack([t + x, t - x]), theta, e)
            end, offered, steps, info, extras = unroller.run(
                thetas, particles, Truncation(trunc.n_steps, start), outer_step)
            out = Unroller.output(end, steps, info, extras)
            loss = out.step_mean()  # [2]: L+, L-
            return loss.mean(), (end, offered, loss, out)

        grad_fn = jax.vmap(jax.grad(pair_loss, has_aux=True), in_axes=(None, 0, 0))
        g_rp, (end, offered, losses, out) = grad_fn(per_device(unroller, meta_params), eps, pairs)
        coef = (losses[:, 0] - losses[:, 1]) / (2.0 * self.std**2)
        g_es = jax.tree.map(lambda e: coef.reshape((n,) + (1,) * (e.ndim - 1)) * e, eps)

        merged = jax.tree.map(lambda a, b: inverse_variance_merge(unroller, a, b), g_rp, g_es)
        is_triple = lambda x: isinstance(x, tuple)  # noqa: E731
        grad = jax.tree.map(lambda m: m[0], merged, is_leaf=is_triple)
        parts = jax.tree.leaves(merged, is_leaf=is_triple)
        es_share = jnp.concatenate([m[1].ravel() for m in parts]).mean()
        flat = lambda i: jnp.concatenate([m[i].ravel() for m in parts])  # noqa: E731
        rp_bad = flat(2).astype(jnp.float32).mean()
        # Metz et al. 2019 Fig. 4: the two estimators' variances, the mean over elements of the
        # per-element variance of one pair's estimate; the reparameterization one over the
        # elements where it is finite (the others are counted by rp_nonfinite_share).
        ok = ~flat(2)
        rp_variance = jnp.where(ok, flat(3), 0.0).sum() / jnp.maximum(ok.sum(), 1)
        rp_variance = jnp.where(ok.any(), rp_variance, jnp.nan)
        es_variance = flat(4).mean()

        extras = {k: v.mean() for k, v in out.extras.items()}  # per pair -> over all
        end, offered, out = from_pairs((end, offered, out._replace(extras={})))
        out = out._replace(extras=extras)
        unroll = unroller.finish(state.unroll, end, offered)
        unroll = unroll._replace(particles=keep_positive(unroll.particles))
        metrics = {
            "meta_loss": losses.mean(),
            **unroll_metrics(unroller, out),
            "es_share": es_share,
            "rp_nonfinite_share": rp_bad,
            "rp_variance": rp_variance,
            "es_variance": es_variance,
        }
        return grad, MergedState(unroll), metrics
