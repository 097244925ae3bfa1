"""Public entry points take JAX's typed keys (``jax.random.key``) as well as raw ones
(``jax.random.PRNGKey``), and give the same numbers for the same seed: the typed key's data is
the raw key's."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.imitation import Imitation
from estimators.unroll import Unroller
from lopt.training import MetaTrainer

TASK = tasks.get("quadratic", dim=3, noise_std=0.1)
LOPT = lopt.get("mlp", hidden_size=4, hidden_layers=1)
UNROLLER = Unroller(TASK, LOPT, 4, 3, schedules.constant(5))


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_components_take_typed_keys():
    typed, raw = jax.random.key(3), jax.random.PRNGKey(3)
    _same(LOPT.init(typed), LOPT.init(raw))
    _same(TASK.sample(typed), TASK.sample(raw))
    spec = TASK.sample(raw)
    _same(TASK.init(spec, typed), TASK.init(spec, raw))


@pytest.mark.parametrize("name", ["tbptt", "pes", "merged", "full_es", "imitation"])
def test_estimators_take_typed_keys(name):
    """Each estimator's own key handling (per-pair perturbations, whole trajectories, imitation
    episodes) under jit with a typed key; the trainer test below compares typed and raw."""
    est = Imitation(estimators.get("tbptt"), prob=1.0) if name == "imitation" else estimators.get(name)
    theta = LOPT.init(jax.random.PRNGKey(0))

    @jax.jit
    def run(seed_key):
        k_init, k_grad = jax.random.split(seed_key)
        state = est.init(UNROLLER, k_init, theta)
        return est.grad(UNROLLER, theta, state, k_grad, jax.numpy.asarray(0))[0]

    grad = run(jax.random.key(1))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grad))


def test_trainer_init_and_step_take_typed_keys():
    trainer = MetaTrainer.create(
        task_family=TASK, learned_opt=LOPT, estimator=estimators.get("es"),
        meta_optimizer=optax.adam(1e-3), num_particles=4, trunc_length=3, horizon=schedules.constant(5))
    typed = trainer.step(trainer.init(jax.random.key(7)))
    raw = trainer.step(trainer.init(jax.random.PRNGKey(7)))
    _same(typed, raw)
