"""The paper configs compute what their docstrings say: ELO's naive twin runs trajectories of
exactly one N-step segment each, and Chen et al.'s imitation teachers make progress within
N_train on the config's own task."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lopt import teachers
from lopt.experiments.harness import configured, task_of
from lopt.training import config as config_lib
from lopt.training import evaluation

TINY = {"task.hidden_sizes": (4,), "task.batch_size": 8, "lopt.hidden_size": 4,
        "lopt.hidden_layers": 1, "unroll.num_particles": 4}


def test_naive_segments_are_fresh_trajectories_of_exactly_n_steps():
    """ELO Table 1's "LO naive": every segment a fresh trajectory of N = trunc_length steps,
    from the first outer step on (no stagger: a staggered first trajectory would straddle two
    truncations and every later one with it)."""
    trainer = config_lib.build(configured("naive", TINY))
    n = trainer.unroller.trunc_length
    assert trainer.unroller.horizon.length == n
    state = trainer.init(jax.random.PRNGKey(0))
    pairs = trainer.unroller.num_particles // 2
    for _ in range(3):
        state, metrics = trainer.step(state)
        # Each pair's trajectory ends at the truncation's last step, and starts the next one fresh.
        assert int(metrics["trajectories_done"]) == pairs
        assert float(metrics["position_max"]) == float(metrics["position_mean"]) == n


def test_chen_teachers_make_progress_within_n_train():
    """Imitation learns from trajectories that go somewhere: each of the config's teachers takes
    mlp_orig (sigmoid, init std 0.01: small gradients) off ln 10 within 40 steps, the first
    N_train that imitates (r = 0 at N_train = 20). The previous teachers (SGD and Adagrad at
    0.1) fail it: they stayed at ln 10 for 160 steps."""
    config = configured("chen2020_dm_cl_il", {})
    task = task_of(config)
    keys = jax.numpy.stack([jax.random.PRNGKey(7_000_000 + i) for i in range(2)])
    for spec in config.imitation.teachers:
        out = evaluation.train_curves(task, teachers.build(teachers.spec(spec)), keys, 40)
        assert float(np.mean(out["final_train_loss"])) < np.log(10) - 0.3, spec
    assert tuple(config.imitation.prob) == (0.0, 0.1, 0.3)  # the code's mt_ratios per stage
