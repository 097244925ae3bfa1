"""Sharded meta-training on 8 forced CPU devices (in subprocesses, see multidevice_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tests import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reduction order: the meta-gradient is a mean over particles, taken per device and then
# across devices (lax.pmean), so it differs from the one-device mean by float32 rounding
# (~1e-7 relative). Adam turns that into meta-param differences far below one step (1e-3):
# we allow 1e-6 absolute, 0.1% of a step.
ATOL = 1e-6


def _worker(*args: str, tmp_path) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 " + FAST_COMPILE, JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT, LOPT_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multidevice_worker", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize(
    "estimator,counts",
    # merged pools per-pair statistics across devices (psum), so it is checked on 8 devices,
    # where every device holds a single pair.
    # tbptt differentiates inside shard_map (a replicated input's gradient would be summed).
    # es_replay: ELO's buffer is one for the run, gathered from every device's particles.
    # The antithetic unroll runs sharded in es_replay (2, 4) and merged's ES half (8); pes
    # itself on 8 and on all of 1, 2, 4, 8 with the slow tests. tbptt's differentiation inside shard_map is also
    # merged's reparameterization half, so it is slow too.
    [pytest.param("pes", "8", marks=pytest.mark.slow),
     pytest.param("pes", "1,2,4,8", marks=pytest.mark.slow), ("merged", "8"),
     pytest.param("tbptt", "4", marks=pytest.mark.slow), ("es_replay", "2,4"),
     # The mlp's fused C++ CPU kernel splits its work over XLA's thread pool, which also runs
     # the devices' programs: a kernel that waited for its queued helpers hung here. Since
     # fused="auto" and --cpu_devices=auto are the defaults, every training subprocess of the
     # fast suite runs the kernel on 2 devices; this exact comparison runs with the slow tests.
     pytest.param("pes_fused", "2", marks=pytest.mark.slow)],
)
def test_same_meta_params_on_1_2_4_8_devices(estimator, counts, tmp_path):
    out = _worker("determinism", estimator, counts, tmp_path=tmp_path)
    base = np.asarray(out["None"]["meta_params"])
    for ndev in counts.split(","):
        np.testing.assert_allclose(out[ndev]["meta_params"], base, atol=ATOL, rtol=0)
        assert out[ndev]["inner_steps"] == out["None"]["inner_steps"] == 16 * 4
        assert out[ndev]["shards"] == int(ndev)
        assert abs(out[ndev]["meta_loss"] - out["None"]["meta_loss"]) < 1e-5
        assert out[ndev]["position_max"] == out["None"]["position_max"]
        # On several CPU devices every call returns computed (MetaTrainer._one_call_at_a_time:
        # XLA:CPU can otherwise reorder two steps' launches on a device and hang in the
        # all-reduce). Without the wait, a step's outputs are still pending when it returns.
        if ndev != "1":
            assert out[ndev]["settled"] == [True] * 4, out[ndev]["settled"]
    # The run really moved: three Adam steps of 1e-3 are far above the tolerance.
    hidden = 16 if estimator.endswith("_fused") else 8
    assert np.abs(base - np.asarray(_initial_params(hidden))).max() > 100 * ATOL


def _initial_params(hidden_size: int):
    import jax

    import lopt

    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(
        lopt.get("mlp", hidden_size=hidden_size, hidden_layers=1).init(
            jax.random.split(jax.random.PRNGKey(0), 3)[0])
    )])


def test_checkpoint_saved_on_8_devices_restores_on_4_and_continues(tmp_path):
    out = _worker("checkpoint", str(tmp_path / "ckpt"), tmp_path=tmp_path)
    assert out["restored_devices"] == 4 and out["outer_step"] == 4
    np.testing.assert_allclose(out["continued"], out["reference"], atol=ATOL, rtol=0)


def test_num_particles_must_divide_by_devices():
    import jax
    import optax
    from jax.sharding import Mesh

    import estimators
    import lopt
    import tasks
    from estimators import schedules
    from lopt.training import MetaTrainer

    mesh = Mesh(np.asarray(jax.devices()[:1] * 1), ("particles",))
    kwargs = dict(task_family=tasks.get("quadratic"), learned_opt=lopt.get("mlp"),
                  estimator=estimators.get("pes"), meta_optimizer=optax.adam(1e-3),
                  num_particles=6, horizon=schedules.constant(5))
    MetaTrainer.create(**kwargs, mesh=mesh)
    with pytest.raises(ValueError, match="axes"):
        MetaTrainer.create(**kwargs, mesh=Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("a", "b")))
