"""``Unroller.particle_chunk`` (issue 26, item 3): the particles of a truncation run in groups,
one group after another, and the meta-gradient, the particles' states, the reset policy's
buffer and the logged figures equal the unchunked run's to float rounding."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

import estimators
import lopt
import tasks
from estimators import schedules
from estimators.base import UnrollMismatch
from estimators.resets import ELOReplay
from lopt.training import MetaTrainer

TASK = tasks.get("quadratic", dim=3, noise_std=0.1)
LOPT = lopt.get("mlp", hidden_size=4, hidden_layers=1, fused=False)


def _trainer(estimator: str, chunk: int, **unroll):
    return MetaTrainer.create(
        task_family=TASK, learned_opt=LOPT, estimator=estimators.get(estimator),
        meta_optimizer=optax.adam(1e-2), num_particles=8, trunc_length=6,
        horizon=schedules.constant(9), particle_chunk=chunk, **unroll)


def _run(trainer, steps=2):
    state = trainer.init(jax.random.key(5))
    logged = []
    for _ in range(steps):
        state, metrics = trainer.step(state)
        logged.append(metrics)
    return state, logged


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind in "biu":
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("estimator,chunk,unroll", [
    # antithetic pairs with per-particle meta-params, and ELO's buffer (states restored from
    # and offered to one buffer across the groups)
    ("es", 2, dict(reset=ELOReplay(capacity=4, p_threshold=0.3), stagger=False)),
    # one meta-params for all, backprop through the groups' map
    ("tbptt", 4, dict()),
])
def test_chunked_run_equals_unchunked(estimator, chunk, unroll):
    whole, whole_log = _run(_trainer(estimator, 0, **unroll))
    grouped, grouped_log = _run(_trainer(estimator, chunk, **unroll))
    _close(whole.meta_params, grouped.meta_params)  # 2 meta-updates: the gradients agree
    _close(whole.estimator_state, grouped.estimator_state)  # particles, the reset policy's buffer
    assert whole_log[-1].keys() == grouped_log[-1].keys()
    for a, b in zip(whole_log, grouped_log):
        _close(a, b)
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(np.asarray(x - y)).max(),
                                         whole.meta_params, _trainer(estimator, 0, **unroll).init(
                                             jax.random.key(5)).meta_params))
    assert max(moved) > 0  # the comparison is of trained meta-params, not of the init twice


def test_chunk_must_divide_the_particles():
    """One line before anything is traced (the trainer's check of the unroll), and the unroll's
    own check when called directly."""
    with pytest.raises(UnrollMismatch, match="3 must divide the 8 particles of a device; e.g. particle_chunk=2"):
        _trainer("tbptt", 3)
    with pytest.raises(UnrollMismatch, match="into whole antithetic pairs; e.g. particle_chunk=0"):
        _trainer("es", 1)  # a group must not split a (+eps, -eps) pair
    with pytest.raises(ValueError, match="particle_chunk must be an integer >= 0"):
        dataclasses.replace(_trainer("tbptt", 0).unroller, particle_chunk=-1)
    u = dataclasses.replace(_trainer("tbptt", 0).unroller, particle_chunk=3)
    key = jax.random.key(0)
    theta = LOPT.init(key)
    state = u.init(theta, key)
    with pytest.raises(ValueError, match="particle_chunk 3 must divide the 8 particles"):
        u.run(theta, state.particles, u.begin(state, key, 0), 0)


def test_groups_run_one_after_another():
    """The chunked run is a map over the groups (a scan of 8 / 2 = 4 iterations at the top of
    the program), each group a scan over the truncation's steps; unchunked, the top is the
    steps' scan itself."""
    key = jax.random.key(0)
    theta = LOPT.init(key)

    def top_scans(chunk):
        u = _trainer("tbptt", chunk).unroller
        state = u.init(theta, key)
        trunc = u.begin(state, key, jax.numpy.asarray(0))
        jaxpr = jax.make_jaxpr(u.run)(theta, state.particles, trunc, jax.numpy.asarray(0))
        return [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]

    assert top_scans(0) == [6]
    assert top_scans(2) == [4]
