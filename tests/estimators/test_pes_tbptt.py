"""PES and TBPTT on the quadratic family: agreement, per-step attribution at resets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.base import sample_perturbation
from estimators.unroll import Unroller

# A deterministic smooth problem: no batch noise, no resets inside the compared truncation.
TASK = tasks.get("quadratic", dim=6, noise_std=0.0, condition_number=10.0)
LOPT = lopt.get("mlp", hidden_size=4, hidden_layers=1)


def _unroller(num_particles, trunc, horizon, **kw):
    return Unroller(TASK, LOPT, num_particles, trunc, schedules.constant(horizon), stagger=False, **kw)


def test_pes_matches_tbptt_on_first_truncation():
    """On a fresh trajectory the PES sum is just eps, so for small std PES is the antithetic
    ES gradient of the truncation loss, whose mean is the TBPTT gradient up to O(std^2).

    We draw K independent PES estimates (fresh eps, same tasks and data) and compare each
    coordinate's mean with TBPTT in units of its standard error; the |z| < 5 bound has a
    per-coordinate false-alarm rate of 6e-7, so the test is stable, while a wrong sign, a
    missing 1/(2 std^2) or a wrong 1/N would give z in the hundreds."""
    n_pairs, k = 8, 256
    unroller = _unroller(2 * n_pairs, trunc=5, horizon=100)
    theta = LOPT.init(jax.random.PRNGKey(0))
    pes = estimators.get("pes", std=1e-3)
    state = pes.init(unroller, jax.random.PRNGKey(1), theta)

    grads = jax.jit(jax.vmap(lambda key: pes.grad(unroller, theta, state, key, 0)[0]))(
        jax.random.split(jax.random.PRNGKey(2), k)
    )
    # TBPTT over the positive members of the pairs (the tasks each pair shares).
    tb_unroller = _unroller(n_pairs, trunc=5, horizon=100)
    tb_state = estimators.tbptt.TBPTTState(
        jax.tree.map(lambda x: x[0::2] if x.ndim else x, state.unroll)
    )
    tb_grad = jax.jit(lambda key: estimators.get("tbptt").grad(tb_unroller, theta, tb_state, key, 0)[0])(
        jax.random.PRNGKey(3)
    )
    g = np.concatenate([np.asarray(x).reshape(k, -1) for x in jax.tree.leaves(grads)], axis=1)
    ref = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tb_grad)])
    mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(k)
    assert np.linalg.norm(ref) > 0
    z = (mean - ref) / np.maximum(se, 1e-12)
    assert np.abs(z).max() < 5.0, np.abs(z).max()
    # And the estimate is informative: the averaged PES gradient points along TBPTT's.
    cos = mean @ ref / (np.linalg.norm(mean) * np.linalg.norm(ref))
    assert cos > 0.9, cos


@pytest.mark.parametrize("horizon,expect", [(7, "eps"), (10, "sum"), (100, "sum")])
def test_pes_perturbation_sum_follows_the_trajectory(horizon, expect):
    """After two truncations of 5 steps: no reset keeps eps1 + eps2; a reset at step 7 (inside
    the second truncation) keeps only eps2, the sum of the new trajectory; a trajectory that
    ends at step 10 still holds eps1 + eps2 (it restarts at the next truncation's first step,
    where PES credits its sum with nothing)."""
    unroller = _unroller(4, trunc=5, horizon=horizon)
    pes = estimators.get("pes", std=0.1)
    theta = LOPT.init(jax.random.PRNGKey(0))
    state = pes.init(unroller, jax.random.PRNGKey(1), theta)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    grad_fn = jax.jit(lambda s, k, t: pes.grad(unroller, theta, s, k, t))
    state1 = grad_fn(state, keys[0], 0)[1]
    state2 = grad_fn(state1, keys[1], 1)[1]
    eps = [sample_perturbation(unroller, jax.random.split(k)[0], theta, 0.1) for k in keys]
    want = {"sum": jax.tree.map(lambda a, b: a + b, eps[0], eps[1]), "eps": eps[1]}[expect]
    for got, w in zip(jax.tree.leaves(state2.accum), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)
    steps = np.asarray(state2.unroll.particles.step)
    assert (steps == {7: 3, 10: 10, 100: 10}[horizon]).all()
    if horizon == 10:  # the third truncation restarts: the old sum takes no part in its gradient
        scrambled = state2._replace(accum=jax.tree.map(lambda x: x + 123.0, state2.accum))
        g, new, _ = grad_fn(state2, keys[2], 2)
        g2, _, _ = grad_fn(scrambled, keys[2], 2)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
            np.testing.assert_array_equal(a, b)
        for got, w in zip(jax.tree.leaves(new.accum), jax.tree.leaves(eps[2])):
            np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7)


def test_pes_odd_particles_error_names_fix():
    unroller = _unroller(5, trunc=2, horizon=10)
    with pytest.raises(ValueError, match="num_particles=6"):
        estimators.get("pes").init(unroller, jax.random.PRNGKey(0), LOPT.init(jax.random.PRNGKey(0)))


def test_unroller_resets_finished_trajectory_with_fresh_task():
    unroller = _unroller(3, trunc=4, horizon=3)
    theta = LOPT.init(jax.random.PRNGKey(0))
    state = unroller.init(theta, jax.random.PRNGKey(0))
    new, out = jax.jit(lambda s, k: unroller.unroll(theta, s, k, 0))(state, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(out.done), np.tile([False, False, True, False], (3, 1)))
    # The ended trajectory restarts at the top of the next step with a fresh task instance.
    np.testing.assert_array_equal(np.asarray(out.reset), np.tile([False, False, False, True], (3, 1)))
    np.testing.assert_array_equal(np.asarray(new.particles.step), [1, 1, 1])
    assert not np.allclose(new.particles.spec["target"], state.particles.spec["target"])
    assert out.losses.shape == (3, 4) and np.isfinite(np.asarray(out.losses)).all()


def test_truncation_shorter_than_its_bucket_advances_only_its_steps():
    """A drawn truncation of 3 steps runs in the compiled bucket of 4: the padded step must
    leave the particles as they were (the unroll skips that select only without a schedule)."""
    unroller = _unroller(2, trunc=4, horizon=100, trunc_schedule=schedules.constant(3))
    assert unroller.buckets[-1] == 4
    theta = LOPT.init(jax.random.PRNGKey(0))
    state = unroller.init(theta, jax.random.PRNGKey(0))
    new, out = jax.jit(lambda s, k: unroller.unroll(theta, s, k, 0))(state, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(new.particles.step), [3, 3])
    np.testing.assert_array_equal(np.asarray(out.mask), np.tile([True, True, True, False], (2, 1)))


def test_tbptt_gradient_matches_finite_differences():
    """TBPTT through a checkpointed scan equals a central finite difference of the same loss
    (in float64, so the difference quotient is not swamped by float32 rounding)."""
    with jax.enable_x64(True):
        _check_tbptt_against_finite_differences()


def _check_tbptt_against_finite_differences():
    unroller = _unroller(2, trunc=6, horizon=100)
    theta = LOPT.init(jax.random.PRNGKey(0))
    tb = estimators.get("tbptt")
    state = tb.init(unroller, jax.random.PRNGKey(1), theta)
    key = jax.random.PRNGKey(2)
    grad = jax.jit(lambda t: tb.grad(unroller, t, state, key, 0)[0])(theta)
    loss = jax.jit(lambda t: tb.grad(unroller, t, state, key, 0)[2]["meta_loss"])
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(4), x.shape), theta)
    h = 1e-4
    shift = lambda s: jax.tree.map(lambda t, d: t + s * h * d, theta, direction)
    fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * h)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    # The LO computes its features in float32 (by design), so agreement is ~1e-4, not 1e-10.
    np.testing.assert_allclose(analytic, fd, rtol=1e-3)
