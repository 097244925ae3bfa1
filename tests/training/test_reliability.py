"""A run that cannot be lost or fool its user: corrupt checkpoints are named, kept and skipped
for the newest intact one; a run whose meta-gradients are all skipped, or whose meta-loss sits
at its clip, stops with one line; one writer per workdir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from lopt.training import train
from lopt.training.checkpoint import CheckpointError, CheckpointMismatchError, CorruptCheckpointWarning
from lopt.training.loop import TrainingStopped
from lopt.training.workdir import WorkdirInUseError, lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(**overrides) -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
    c.task = ConfigDict(dict(name="quadratic", dim=3))
    c.lopt = ConfigDict(dict(name="hyper_adam"))
    c.estimator = ConfigDict(dict(name="pes", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=1e-2))
    c.unroll = ConfigDict(dict(num_particles=2, trunc_length=2, horizon=ConfigDict(dict(name="constant", length=5))))
    for k, v in overrides.items():
        c[k] = v
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("wall_time", "inner_steps_per_sec")}
                for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    out = train(config(num_outer_steps=6), workdir, progress=False)
    return _rows(workdir), jax.device_get(out["state"].meta_params)


def _newest_files(workdir, step):
    base = os.path.join(workdir, "checkpoints", str(step), "arrays")
    return [os.path.join(r, f) for r, _, fs in os.walk(base) for f in fs]


def _overwrite(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(0, os.path.getsize(path) // 2))


def _remove(path):
    os.remove(path)


@pytest.mark.parametrize("damage", [  # one in the fast suite: the same fallback path
    pytest.param("overwrite", marks=pytest.mark.slow), "truncate",
    pytest.param("remove", marks=pytest.mark.slow)])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(damage, tmp_path, reference):
    """Damage the step-4 checkpoint (array data overwritten, a data file cut in half, or a
    metadata file deleted): the restart names it, keeps it as 4.corrupt, resumes from step 2 and
    ends exactly like the uninterrupted run."""
    workdir = str(tmp_path)
    train(config(), workdir, progress=False)
    files = _newest_files(workdir, 4)
    if damage == "remove":
        target = next(f for f in files if os.path.basename(f) == "_METADATA")
    else:  # the largest array-data file
        target = max((f for f in files if "/arrays/d/" in f), key=os.path.getsize)
    {"overwrite": _overwrite, "truncate": _truncate, "remove": _remove}[damage](target)
    with pytest.warns(CorruptCheckpointWarning, match=r"checkpoint 4 in .* is corrupt"):
        out = train(config(num_outer_steps=6), workdir, progress=False)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.corrupt"))  # kept, not deleted
    rows, params = reference
    assert _rows(workdir) == rows
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(out["state"].meta_params))):
        np.testing.assert_array_equal(a, b)


def test_no_intact_checkpoint_is_one_line(tmp_path):
    workdir = str(tmp_path)
    train(config(), workdir, progress=False)
    for step in (2, 4):
        for f in _newest_files(workdir, step):
            if "/arrays/d/" in f:
                _overwrite(f)
    with pytest.warns(CorruptCheckpointWarning), pytest.raises(CheckpointError) as e:
        train(config(num_outer_steps=6), workdir, progress=False)
    message = str(e.value)
    assert "\n" not in message and "no intact checkpoint" in message
    assert "4 (" in message and "2 (" in message and "4.corrupt" in message


def test_checkpoint_of_another_config_is_named(tmp_path):
    """Different shapes (a 5-d quadratic's particles in a 3-d workdir) are not corruption: the
    run refuses with the first differing array, and renames nothing."""
    workdir = str(tmp_path)
    train(config(), workdir, progress=False)
    other = config(num_outer_steps=6, task=ConfigDict(dict(name="quadratic", dim=5)))
    with pytest.raises(CheckpointMismatchError, match=r"written by another config: .*\(2, 3\).*\(2, 5\)"):
        train(other, workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "2.files.json", "4", "4.files.json"]


def test_a_run_whose_meta_gradients_are_all_skipped_stops(tmp_path):
    """Inner runs that overflow (quadratic bowls initialised at 1e30) give non-finite meta-
    losses; without a clip every meta-gradient is skipped, and after max_skipped in a row the
    run stops with one line naming the cause and the last good checkpoint, exporting nothing."""
    c = config(num_outer_steps=40, task=ConfigDict(dict(name="quadratic", dim=3, init_scale=1e30)),
               health=ConfigDict(dict(max_skipped=5)))
    with pytest.raises(TrainingStopped) as e:
        train(c, str(tmp_path), progress=False)
    message = str(e.value)
    assert "\n" not in message and "the last 5 meta-gradients were non-finite" in message
    assert "training stopped at outer step 5" in message and "last good checkpoint is step 4" in message
    assert not os.path.exists(os.path.join(str(tmp_path), "export"))
    rows = _rows(str(tmp_path))
    assert rows[-1]["num_skipped"] == 5 and rows[-1]["step"] == 5


def test_a_run_stuck_at_the_clip_stops(tmp_path):
    """With a clip, the same diverged runs sit at it: no gradient, nothing learnt; after
    max_clipped_logs logs with every term at the clip the run stops."""
    c = config(num_outer_steps=40, task=ConfigDict(dict(name="quadratic", dim=3, init_scale=1e30)),
               health=ConfigDict(dict(max_clipped_logs=3)))
    c.unroll.meta_loss = ConfigDict(dict(clip=2.0))
    with pytest.raises(TrainingStopped, match=r"every meta-loss term sat at its clip for 3 logged steps"):
        train(c, str(tmp_path), progress=False)
    assert _rows(str(tmp_path))[-1]["clipped_share"] == 1.0


class _Checkpoints:
    """Checkpointing's checkpointer, as far as Health asks it."""

    class ckpt:  # noqa: N801
        @staticmethod
        def latest_step():
            return 40


def _health_run(options, shares):
    """Feed Health logged steps whose metrics have the given (clipped, nonfinite) shares; the
    run it stopped, or None."""
    from lopt.training.hooks import Health, Run

    health = Health(options, log_every=10, checkpointing=_Checkpoints())
    run = Run(config=None, workdir="/nonexistent", trainer=None, primary=True, total=1000)
    for i, (clipped, nonfinite) in enumerate(shares):
        run.step = 10 * (i + 1)
        health.after_step(run, {"consecutive_skipped": np.int32(0), "clipped_share": np.float32(clipped),
                                "nonfinite_share": np.float32(nonfinite)})
        if run.stop is not None:
            return run
    return None


def test_a_run_whose_inner_losses_stay_non_finite_stops():
    """With a meta-loss clip a non-finite term becomes the clip value: ES/PES skip nothing, and
    a run whose inner losses stay non-finite while some terms are below the clip would never
    stop. health.max_nonfinite_share stops it after max_clipped_logs logged steps above it,
    with one line naming the option and the last good checkpoint; a step below resets the
    count, and an imitation step (NaN shares) leaves it as it was."""
    from lopt.training.hooks import HealthOptions

    options = HealthOptions(max_clipped_logs=3, max_nonfinite_share=0.5)
    run = _health_run(options, [(0.6, 0.8), (0.6, 0.9), (0.7, 0.7)])
    assert run is not None and run.failure == run.stop
    assert "\n" not in run.failure
    assert run.failure.startswith("training stopped at outer step 30: the non-finite share of inner "
                                  "losses stayed above health.max_nonfinite_share=0.5 for 3 logged")
    assert run.failure.endswith("the last good checkpoint is step 40")
    assert _health_run(options, [(0.6, 0.8), (0.6, 0.9), (0.6, 0.4), (0.6, 0.8), (0.6, 0.8)]) is None
    nan = float("nan")
    assert _health_run(options, [(0.6, 0.8), (nan, nan), (0.6, 0.9), (0.6, 0.9)]).step == 40
    assert _health_run(HealthOptions(max_clipped_logs=3, max_nonfinite_share=1.0), [(0.6, 1.0)] * 5) is None


def test_max_nonfinite_share_is_checked():
    from lopt.training.loop import health_options
    from tasks.registry import ConfigError

    assert health_options(config(health=ConfigDict(dict(max_nonfinite_share=0.2)))).max_nonfinite_share == 0.2
    with pytest.raises(ConfigError, match=r"config.health: max_nonfinite_share must be a number in \[0, 1\]"):
        health_options(config(health=ConfigDict(dict(max_nonfinite_share=1.5))))


_HOLDER = """
import sys, time
from lopt.training.workdir import lock
held = lock(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_one_writer_per_workdir_and_stale_locks_are_taken_over(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirInUseError, match=rf"in use by pid {holder.pid} on host"):
            lock(workdir)
        with pytest.raises(WorkdirInUseError):  # train() refuses before writing anything
            train(config(), workdir, progress=False)
        assert sorted(os.listdir(workdir)) == [".lock"]
    finally:
        holder.kill()  # SIGKILL: the lock file stays, the kernel drops the flock
        holder.wait()
    assert os.path.exists(os.path.join(workdir, ".lock"))
    held = lock(workdir)  # stale: taken over
    assert json.load(open(os.path.join(workdir, ".lock")))["pid"] == os.getpid()
    held.release()
    assert not os.path.exists(os.path.join(workdir, ".lock"))
