"""Statistical correctness of the estimators against closed-form meta-gradients.

Every comparison uses fixed seeds and a tolerance of 3 standard errors, the standard error
estimated from R independent replicas of the estimator. Each test also checks its own power:
the quantity it must detect is many standard errors away from what a wrong estimator gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import estimators
from estimators import schedules
from estimators.unroll import MetaLoss, Unroller
from tests.estimators.toys import ConstantStep, Cosine, FixedQuadratic, LearnedLR

EXACT = MetaLoss(split="train", normalize="none", clip=1e30)  # the raw mean per-step loss
TASK = FixedQuadratic()
LO = ConstantStep()
THETA = LO.init(None)


def _unroller(task, lo, num_particles, trunc, horizon):
    return Unroller(task, lo, num_particles, trunc, schedules.constant(horizon), EXACT, stagger=False)


def _replicas(estimator, unroller, theta, replicas, truncations=1, seed=0):
    """R independent runs of `truncations` consecutive estimator calls from a fresh state;
    returns [R, D] averages of the per-truncation gradients and the last metrics."""

    def one(key):
        k_init, k_run = jax.random.split(key)
        state = estimator.init(unroller, k_init, theta)
        total = jax.tree.map(jnp.zeros_like, theta)
        for t, k in enumerate(jax.random.split(k_run, truncations)):
            g, state, metrics = estimator.grad(unroller, theta, state, k, t)
            total = jax.tree.map(lambda a, b: a + b / truncations, total, g)
        return jnp.concatenate([x.ravel() for x in jax.tree.leaves(total)]), metrics

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(seed), replicas))


def _z(samples, target):
    samples = np.asarray(samples, np.float64)
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    return (mean - target) / se, se


@pytest.mark.parametrize("name,trunc,horizon", [("es", 4, 100), ("pes", 4, 100), ("full_es", 4, 12)])
def test_es_family_matches_closed_form_smoothed_gradient(name, trunc, horizon):
    """Meta-loss quadratic in theta (x_t = x0 + t theta on a fixed quadratic): Gaussian smoothing
    only adds a constant, so the smoothed gradient is the closed form below. es and pes on a
    first truncation of 4 steps, full_es on a whole trajectory of 12."""
    estimator = estimators.get(name, std=0.05)
    unroller = _unroller(TASK, LO, 8, trunc, horizon)
    samples, _ = _replicas(estimator, unroller, THETA, replicas=1000)
    length = horizon if name == "full_es" else trunc
    target = TASK.trajectory_gradient(np.asarray(THETA["step"]), length)
    z, se = _z(samples, target)
    assert np.all(np.abs(z) < 3.0), z
    # Power: an estimator off by a factor 2 (or 1/2) would sit >= 3 standard errors away.
    assert np.all(np.abs(target) > 6 * se), (target, se)


def test_pes_is_unbiased_across_truncations_and_tbptt_is_not():
    """A 12-step trajectory cut into 3 truncations of 4. PES accumulated over the trajectory
    matches the full-unroll gradient; TBPTT equals the hand-computed truncated gradient (each
    truncation treats its starting state as a constant), which is many PES standard errors
    away from the full one."""
    trunc, length = 4, 12
    unroller = _unroller(TASK, LO, 32, trunc, length)
    theta = np.asarray(THETA["step"])
    full = TASK.trajectory_gradient(theta, length)
    truncated = TASK.trajectory_gradient(theta, length, trunc=trunc)

    pes, _ = _replicas(estimators.get("pes", std=0.05), unroller, THETA, 1000, truncations=3)
    z, se = _z(pes, full)
    assert np.all(np.abs(z) < 3.0), z

    tbptt, _ = _replicas(estimators.get("tbptt"), unroller, THETA, 2, truncations=3)
    np.testing.assert_allclose(np.asarray(tbptt[0]), truncated, rtol=1e-4, atol=1e-7)
    # Power: TBPTT's answer is more than 5 PES standard errors from the full gradient, so a
    # PES that were as biased as TBPTT would fail the |z| < 3 check above.
    assert np.all(np.abs(truncated - full) > 5 * se), (truncated - full, se)


def test_truncated_es_is_biased_like_tbptt_across_truncations():
    """ES carries the positive trajectory's state forward and ignores its dependence on theta,
    so over a cut trajectory it converges to the truncated gradient, not the full one."""
    trunc, length = 4, 12
    unroller = _unroller(TASK, LO, 32, trunc, length)
    theta = np.asarray(THETA["step"])
    truncated = TASK.trajectory_gradient(theta, length, trunc=trunc)
    full = TASK.trajectory_gradient(theta, length)
    es, _ = _replicas(estimators.get("es", std=0.01), unroller, THETA, 1000, truncations=3)
    z, se = _z(es, truncated)
    # Continuing from theta + eps shifts the state by O(std) per truncation: allow that, as
    # the perturbation is small against the 10-standard-error gap to the full gradient.
    assert np.all(np.abs(z) < 4.0), z
    assert np.all(np.abs(truncated - full) > 6 * se)


def test_merged_gives_es_the_weight_when_the_unroll_is_chaotic():
    """x <- x - a sin(x) with a = exp(1.8) ~ 6 is chaotic: d loss / d a through 40 steps grows
    like e^{40 lambda}, so the reparameterization samples' variance dwarfs ES's (whose loss
    differences are bounded by the bounded loss)."""
    unroller = _unroller(Cosine(dim=4), LearnedLR(dim=1, log_lr=1.8), 16, 40, 1000)
    theta = LearnedLR(dim=1, log_lr=1.8).init(None)
    _, metrics = _replicas(estimators.get("merged", std=0.01), unroller, theta, replicas=4)
    assert np.all(np.asarray(metrics["es_share"]) > 0.95), metrics["es_share"]


def test_merged_logs_the_variances_it_weighs_and_rp_variance_explodes_with_the_unroll():
    """Metz et al. 2019 Fig. 4's mechanism on the chaotic map above: the reparameterization
    estimate's variance grows by orders of magnitude with the truncation length while ES's stays
    within one. With one meta-param the ES weight is exactly v_rp / (v_rp + v_es), so the logged
    variances must be the ones eq. 1 weighed by."""
    lo = LearnedLR(dim=1, log_lr=1.8)
    rp, es = [], []
    for trunc in (5, 10, 20):
        unroller = _unroller(Cosine(dim=4), lo, 16, trunc, 1000)
        _, m = _replicas(estimators.get("merged", std=0.01), unroller, lo.init(None), replicas=4)
        assert np.all(np.asarray(m["rp_nonfinite_share"]) == 0)
        v_rp, v_es = (np.asarray(m[k], np.float64) for k in ("rp_variance", "es_variance"))
        np.testing.assert_allclose(np.asarray(m["es_share"]), v_rp / (v_rp + v_es), rtol=1e-4)
        rp.append(np.median(v_rp))
        es.append(np.median(v_es))
    assert rp[1] > 1e3 * rp[0] and rp[2] > 1e3 * rp[1], rp
    assert max(es) < 10 * min(es), es


def test_merged_gives_reparameterization_the_weight_on_smooth_high_dimensional_unrolls():
    """Per-coordinate learning rates (64 meta-params) on a smooth quadratic over 4 steps: ES's
    variance scales with the dimension, the reparameterization gradient barely varies."""
    dim = 64
    task = FixedQuadratic(h=(1.0,) * dim, c=(1.0,) * dim, x0=(0.0,) * dim)
    lo = LearnedLR(dim=dim, log_lr=-1.0)
    unroller = _unroller(task, lo, 16, 4, 1000)
    _, metrics = _replicas(estimators.get("merged", std=0.01), unroller, lo.init(None), replicas=4)
    assert np.all(np.asarray(metrics["es_share"]) < 0.05), metrics["es_share"]
    assert np.all(np.asarray(metrics["es_variance"]) > 20 * np.asarray(metrics["rp_variance"]))


def test_merged_mean_is_unbiased_on_the_closed_form_problem():
    """On a quadratic the antithetic reparameterization gradient is exact for every pair (its
    variance is float rounding), so merged must return the closed form, to float tolerance."""
    samples, metrics = _replicas(
        estimators.get("merged", std=0.05), _unroller(TASK, LO, 8, 4, 100), THETA, 200
    )
    target = TASK.trajectory_gradient(np.asarray(THETA["step"]), 4)
    np.testing.assert_allclose(np.asarray(samples).mean(0), target, rtol=1e-4)
    assert np.all(np.asarray(metrics["es_share"]) < 0.01)
