"""Every estimator runs inside one compiled outer step that is never recompiled, while the
trajectory length (horizon) and the truncation length vary from one outer step to the next."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from lopt.training import MetaTrainer


# The length buckets are the Unroller's, shared by every estimator: pes runs in the fast suite
# (its lax.switch over buckets is the one every estimator calls), the others with the slow tests.
@pytest.mark.parametrize("name", [pytest.param("tbptt", marks=pytest.mark.slow),
                                  pytest.param("es", marks=pytest.mark.slow), "pes",
                                  pytest.param("merged", marks=pytest.mark.slow),
                                  pytest.param("full_es", marks=pytest.mark.slow)])
def test_no_recompilation_across_outer_steps_with_varying_lengths(name):
    trainer = MetaTrainer.create(
        task_family=tasks.get("quadratic", dim=3),
        learned_opt=lopt.get("mlp", hidden_size=4, hidden_layers=1),
        estimator=estimators.get(name),
        meta_optimizer=optax.adam(1e-3),
        num_particles=4,
        trunc_length=4,
        horizon=schedules.linear(start=6, end=30, steps=4, jitter=0.2),
        trunc_schedule=schedules.get("log_uniform", low=1, high=4),
    )
    state = trainer.init(jax.random.PRNGKey(0))
    inner_steps = []
    for _ in range(5):
        state, metrics = trainer.step(state)
        inner_steps.append(int(metrics["inner_steps"]))
        assert np.isfinite(float(metrics["meta_loss"])) and bool(metrics["grad_finite"])
    assert trainer._step_fn._cache_size() == 1
    # The lengths really varied (truncation lengths, or full_es trajectory lengths).
    assert len(set(inner_steps)) > 1, inner_steps


def test_schedules():
    key = jax.random.PRNGKey(0)
    lin = schedules.linear(start=50, end=10_000, steps=100, jitter=0.2)
    draws = np.array([int(lin(k, 50)) for k in jax.random.split(key, 200)])
    mid = 50 + (10_000 - 50) * 0.5
    assert draws.min() >= 0.8 * mid - 1 and draws.max() <= 1.2 * mid + 1
    assert draws.std() > 0.05 * mid  # the jitter is there
    assert abs(int(lin(key, 10**6)) - 10_000) <= 2_000  # flat after `steps`
    assert lin.max_length == 12_000
    logu = schedules.get("log_uniform", low=10, high=1000)
    d = np.array([int(logu(k, 0)) for k in jax.random.split(key, 400)])
    assert d.min() >= 10 and d.max() <= 1000
    assert 0.25 < np.mean(d < 100) < 0.75  # half the draws below the geometric midpoint
    st = schedules.get("stages", lengths=(100, 200, 500), boundaries=(10, 20))
    assert [int(st(key, s)) for s in (0, 9, 10, 19, 20, 99)] == [100, 100, 200, 200, 500, 500]
    with pytest.raises(ValueError, match="boundaries"):
        schedules.get("stages", lengths=(1, 2), boundaries=())
    assert schedules.power_of_two_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def test_linear_schedule_defaults_are_metz_2019s():
    """Sec. 4.3: "we linearly increase the number of unrolled steps from 50 to 10,000 over the
    course of 5,000 outer-training weight updates ... jittered by ... up to 20%"."""
    lin = schedules.linear()
    assert (lin.start, lin.end, lin.steps, lin.jitter) == (50, 10_000, 5_000, 0.2)
    assert schedules.get("linear") == lin
    np.testing.assert_allclose(float(lin.mean_length(2_500)), 50 + (10_000 - 50) / 2)
