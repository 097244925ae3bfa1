"""Every optimizer of the zoo gives finite first- and second-order meta-gradients when some of
the optimizee's gradients are exactly zero.

8x8 digits have always-black pixels: the weights they feed get exactly-zero gradients, so any
sqrt(v) of a second moment sits at v = 0, where d sqrt(v)/dv is infinite and inf * 0 = NaN in
a second-order meta-gradient. That used to skip every outer step (``num_skipped``) of
second-order TBPTT with ``hyper_adam`` or ``rnnprop`` and push ``merged`` to pure ES
(``es_share`` = 1). Each cell of {optimizers} x {tbptt, pes, merged} meta-trains 3 outer steps
on a tiny digits MLP: no step skipped, the meta-params move, and ``merged`` keeps a share of
the reparameterization gradient.
"""

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

TASK = tasks.get("digits_mlp", hidden_sizes=(4,), batch_size=8)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """The 15 cells are all compilation (3 outer steps each): skip XLA's optimisation passes."""
    old = jax.config.jax_optimization_level
    jax.config.update("jax_optimization_level", "O0")
    yield
    jax.config.update("jax_optimization_level", old)
ZOO = {
    "mlp": dict(hidden_size=4),
    "adafac_mlp": dict(hidden_size=4, hidden_layers=1),
    "lstm_dm": dict(hidden_size=4, num_layers=1),
    "rnnprop": dict(hidden_size=4, num_layers=1),
    "hyper_adam": {},
}
ESTIMATORS = {"tbptt": {}, "pes": dict(std=0.01), "merged": dict(std=0.01)}


# PES never differentiates through the unroll, so the second-order NaN this guards against
# cannot arise there; its column (forward losses only, which the other columns run too) is slow.
# merged's reparameterization half is tbptt's differentiated unroll, which the fast suite runs
# for every optimizer: its column runs there for mlp only (merged's own ES half and inverse-
# variance merge), the rest with the slow tests (suite time, issue 16).
def _fast(name, estimator):
    return estimator == "tbptt" or (estimator == "merged" and name == "mlp")


@pytest.mark.parametrize("name, estimator", [
    (n, e) if _fast(n, e) else pytest.param(n, e, marks=pytest.mark.slow)
    for e in ESTIMATORS for n in ZOO])
def test_meta_training_never_skips_a_step(name, estimator):
    trainer = MetaTrainer.create(
        task_family=TASK,
        learned_opt=lopt.get(name, **ZOO[name]),
        estimator=estimators.get(estimator, **ESTIMATORS[estimator]),
        meta_optimizer=optax.adam(1e-2),
        num_particles=4,
        trunc_length=2,
        horizon=schedules.constant(6),
    )
    state = trainer.init(jax.random.PRNGKey(0))
    start = jax.device_get(state.meta_params)
    es_share = []
    for _ in range(3):
        state, metrics = trainer.step(state)
        es_share.append(float(metrics.get("es_share", 0.0)))
    assert int(state.num_skipped) == 0
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(jax.device_get(state.meta_params)), jax.tree.leaves(start))]
    assert max(moved) > 0
    if estimator == "merged":  # a non-finite reparameterization gradient would give es_share 1
        assert max(es_share) < 0.99, es_share
