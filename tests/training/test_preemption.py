"""SIGTERM and SIGINT end a run at an outer-step boundary with a checkpoint and one line, and
the resumed run equals one never stopped (meta-params, metrics rows, TensorBoard scalars); a
kill -9 leaves logs that a resume cuts back to its checkpoint, so they read as one run."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lopt.training import checkpoint as ckpt_lib
from lopt.training import train
from lopt.training.hooks import Hook, read_metrics
from lopt.training.preemption import Interrupted
from lopt.training.tensorboard import read_scalars
from tests.training.test_reliability import ROOT, _rows, config

TIMING = ("meta/wall_time", "meta/inner_steps_per_sec")
LONG = 10**6  # outer steps: a run that only a signal ends


def _scalars(workdir):
    got = read_scalars(os.path.join(workdir, "tensorboard"))
    return {tag: series for tag, series in got.items() if tag not in TIMING}


def _same_run(workdir, reference_dir, out, reference):
    assert _rows(workdir) == _rows(reference_dir)
    assert _scalars(workdir) == _scalars(reference_dir)
    for a, b in zip(jax.tree.leaves(jax.device_get(reference["state"].meta_params)),
                    jax.tree.leaves(jax.device_get(out["state"].meta_params))):
        np.testing.assert_array_equal(a, b)


def _launch(tmp_path, workdir, **overrides):
    """``lopt-train`` on the quadratic config of test_reliability, in a subprocess."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from tests.training.test_reliability import config\n\n\ndef get_config():\n"
                   f"    return config(**{overrides!r})\n")
    return subprocess.Popen(
        [sys.executable, "-m", "lopt.cli.train", f"--config={cfg}", f"--workdir={workdir}",
         "--progress=false"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))


def _wait_for_row(proc, workdir, step, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_metrics(path)
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no row at step {step} within {timeout} s")


def test_sigterm_at_a_random_outer_step_saves_it_and_the_resume_is_exact(tmp_path):
    """The signal lands at a random outer step (log_every=7, so mostly between two rows, and
    no periodic checkpoint at all): the command saves that step, prints one line, exits 143;
    rerun, it ends exactly like a run never stopped, rows averaged over the same steps."""
    after = random.randint(3, 60)
    workdir = str(tmp_path / "run")
    proc = _launch(tmp_path, workdir, num_outer_steps=LONG, log_every=7, checkpoint_every=LONG)
    _wait_for_row(proc, workdir, after)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"stopped by SIGTERM at outer step (\d+); checkpoint \1 saved; rerun the same "
                     r"command to resume", last)
    assert m, last
    step = int(m.group(1))
    assert step >= after and sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
        str(step), f"{step}.files.json"]
    assert not os.path.exists(os.path.join(workdir, "export"))  # a stopped run is not exported
    total = step + 9  # a row or two after the resume, and the last step's
    c = config(num_outer_steps=total, log_every=7, checkpoint_every=LONG)
    out = train(c, workdir, progress=False)
    ref = train(c, str(tmp_path / "reference"), progress=False)
    _same_run(workdir, str(tmp_path / "reference"), out, ref)


@pytest.fixture
def sigint_handled():
    """Python's own SIGINT handler for the test (a shell's background job, as CI may run
    pytest, starts with SIGINT ignored, and a run leaves an ignored signal ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class _Signal(Hook):
    """Sends ``signals`` to this process after outer step ``step``."""

    def __init__(self, step, *signals):
        self.step, self.signals = step, signals

    def after_step(self, run, metrics):
        if run.step == self.step:
            for s in self.signals:
                os.kill(os.getpid(), s)


def test_sigint_and_a_second_signal_during_the_save(tmp_path, monkeypatch, sigint_handled):
    """Ctrl-C after step 3 (checkpoints every 2): step 3 is saved and the exit code is 130; a
    SIGTERM that arrives while that checkpoint is written waits for it, so it is intact and the
    resume equals an uninterrupted run."""
    original = ckpt_lib.Checkpointer.save
    seen = []

    def save(self, step, items, host=None):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the second signal, mid-save
            seen.append(step)
        return original(self, step, items, host)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    workdir = str(tmp_path / "run")
    with pytest.raises(Interrupted) as e:
        train(config(num_outer_steps=6), workdir, progress=False, hooks=(_Signal(3, signal.SIGINT),))
    assert seen == [3]
    assert str(e.value) == ("stopped by SIGINT at outer step 3; checkpoint 3 saved; rerun the same "
                            "command to resume")
    assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    out = train(config(num_outer_steps=6), workdir, progress=False)
    ref = train(config(num_outer_steps=6), str(tmp_path / "reference"), progress=False)
    _same_run(workdir, str(tmp_path / "reference"), out, ref)


def test_a_second_signal_outside_a_save_stops_at_once(tmp_path, sigint_handled):
    workdir = str(tmp_path / "run")
    with pytest.raises(Interrupted) as e:
        train(config(num_outer_steps=6), workdir, progress=False,
              hooks=(_Signal(3, signal.SIGINT, signal.SIGINT),))
    assert e.value.exit_code == 130
    assert str(e.value) == (f"stopped at once by a second SIGINT at outer step 3 (not saved); the last "
                            f"intact checkpoint is step 2 ({workdir}/checkpoints/2); rerun the same "
                            "command to resume from it")


def test_after_kill_9_the_resumed_logs_read_as_one_run(tmp_path):
    """kill -9 some rows after a checkpoint (every 5 steps), and a last row cut short
    mid-write: the resume drops the rows after its checkpoint and the cut row, TensorBoard's
    file discards the killed run's events after it, and rows and scalars equal those of a run
    never stopped, each step once."""
    workdir = str(tmp_path / "run")
    proc = _launch(tmp_path, workdir, num_outer_steps=LONG, log_every=1, checkpoint_every=5)
    _wait_for_row(proc, workdir, random.randint(12, 40))
    proc.kill()
    proc.communicate(timeout=60)
    last = read_metrics(os.path.join(workdir, "metrics.jsonl"))[-1]["step"]
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": %d, "meta_loss": 0.12' % (last + 1))  # a row cut short by the kill
    total = last + 4
    c = config(num_outer_steps=total, log_every=1, checkpoint_every=5)
    out = train(c, workdir, progress=False)
    steps = [r["step"] for r in _rows(workdir)]
    assert steps == list(range(1, total + 1))
    ref = train(c, str(tmp_path / "reference"), progress=False)
    _same_run(workdir, str(tmp_path / "reference"), out, ref)
