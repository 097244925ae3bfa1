"""The meta-loss (estimators/unroll.py, MetaLoss): every update scored, a theta-independent
normaliser, and normalise/clip as options that cannot silently zero a meta-gradient.

Hand-computed references on a fixed quadratic with the constant-step optimizer
x_t = x0 + t theta (tests/estimators/toys.py), where every quantity has a closed form."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import estimators
from estimators import schedules
from estimators.unroll import MetaLoss, Unroller
from tests.estimators.toys import ConstantStep, FixedQuadratic

TASK = FixedQuadratic()
LO = ConstantStep()
THETA = LO.init(None)
TBPTT = estimators.get("tbptt")


def _tbptt(meta_loss: MetaLoss, trunc: int, task=TASK, horizon: int = 100):
    """(meta-gradient, metrics) of one TBPTT truncation of 2 identical fresh particles."""
    unroller = Unroller(task, LO, 2, trunc, schedules.constant(horizon), meta_loss, stagger=False)
    state = TBPTT.init(unroller, jax.random.PRNGKey(0), THETA)
    grad, _, metrics = jax.jit(lambda t, k: TBPTT.grad(unroller, t, state, k, 0))(THETA, jax.random.PRNGKey(1))
    return np.asarray(grad["step"], np.float64), jax.device_get(metrics)


def _hand_gradient(task: FixedQuadratic, trunc: int) -> np.ndarray:
    """d/dtheta of 1/K sum_{t=1..K} l(x0 + t theta), l = 1/2 mean h (x - c)^2, by hand."""
    h, c, x0 = (np.asarray(v, np.float64) for v in (task.h, task.c, task.x0))
    theta = np.asarray(THETA["step"], np.float64)
    return sum(t * h * (x0 + t * theta - c) / h.size for t in range(1, trunc + 1)) / trunc


def test_tbptt_with_one_step_truncations_scores_the_update():
    """K = 1: the meta-loss is l(x1), x1 = x0 + theta, so the gradient is h (x1 - c) / n. Scoring
    the loss before the update (l(x0), which theta cannot change) gave exactly 0."""
    grad, _ = _tbptt(MetaLoss(), trunc=1)
    want = _hand_gradient(TASK, 1)
    assert np.abs(want).min() > 0.1
    np.testing.assert_allclose(grad, want, rtol=1e-5)


def test_tbptt_scores_every_update_of_a_truncation():
    grad, _ = _tbptt(MetaLoss(), trunc=3)
    np.testing.assert_allclose(grad, _hand_gradient(TASK, 3), rtol=1e-5)


def test_meta_gradient_does_not_flow_through_the_normaliser():
    """With normalize="initial" each term is divided by the loss of the initial params, which
    theta cannot change: the meta-gradient is the unnormalised one divided by that constant,
    for both splits. (A normaliser taken after the first learned update depended on theta and
    rewarded a bad first step.)"""
    init_loss = 0.5 * np.mean(np.asarray(TASK.h) * (np.asarray(TASK.x0) - np.asarray(TASK.c)) ** 2)
    for split in ("train", "valid"):
        plain, _ = _tbptt(MetaLoss(split=split), trunc=3)
        normalised, metrics = _tbptt(MetaLoss(split=split, normalize="initial"), trunc=3)
        np.testing.assert_allclose(normalised, plain / init_loss, rtol=1e-5)
        assert metrics["unnormalized_share"] == 0.0


def test_default_meta_loss_is_the_plain_mean_without_clipping():
    """Metz et al. 2019's objective: no normalisation and no clip by default; a raw loss far
    above 2 still has its gradient (a default clip at 2 would zero it)."""
    assert MetaLoss().normalize == "none" and MetaLoss().clip is None
    far = dataclasses.replace(TASK, c=(10.0, -10.0, 5.0))  # loss ~ 40 at every step
    grad, metrics = _tbptt(MetaLoss(), trunc=2, task=far)
    assert metrics["meta_loss"] > 10.0
    np.testing.assert_allclose(grad, _hand_gradient(far, 2), rtol=1e-5)
    clipped, _ = _tbptt(MetaLoss(clip=2.0), trunc=2, task=far)  # the option still clips
    np.testing.assert_array_equal(clipped, 0.0)


def test_zero_initial_loss_does_not_zero_the_meta_gradient():
    """A trajectory that starts at loss 0 (as the influence-balancing system of Vicol et al.
    2021 does): normalising by ~0 would put every term at the clip and the meta-gradient at 0.
    Its terms are left unnormalised instead, and the metric says so."""
    at_optimum = dataclasses.replace(TASK, x0=TASK.c)
    grad, metrics = _tbptt(MetaLoss(normalize="initial", clip=2.0), trunc=2, task=at_optimum)
    want = _hand_gradient(at_optimum, 2)
    assert np.abs(want).min() > 1e-3
    np.testing.assert_allclose(grad, want, rtol=1e-5)
    assert metrics["unnormalized_share"] == 1.0
