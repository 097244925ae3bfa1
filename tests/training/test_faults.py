"""A failed write (full disk, permissions, read-only filesystem) is one line naming the path,
the errno's meaning, the free space and the last intact checkpoint; the half-written checkpoint
is removed, and once the cause is gone the same run resumes from the last intact checkpoint to
the numbers of a run never stopped. Faults are injected at each kind of write (checkpoint,
metrics.jsonl, TensorBoard, export, plot); a real full disk (a 700 KB tmpfs) is in
docs/training.md, "Reliability"."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lopt.training import faults, metrics_log, train
from lopt.training.faults import WriteFailed
from lopt.training.hooks import Hook
from lopt.training.tensorboard import read_scalars
from tests.training.test_reliability import ROOT, _rows, config

TIMING = ("meta/wall_time", "meta/inner_steps_per_sec")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    out = train(config(num_outer_steps=6), workdir, progress=False)
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    return _rows(workdir), jax.device_get(out["state"].meta_params), scalars


def _fail(err):
    return OSError(err, os.strerror(err))


def _checkpoint(monkeypatch, err):
    """orbax's JSON item of checkpoint 4 fails inside orbax's save (its temporary directory
    exists by then)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    original = handler.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        if "4.orbax-checkpoint-tmp" in str(directory):
            raise OSError(err, os.strerror(err), str(directory / "host"))
        return await original(self, x, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", save_fn)
    return ((), "cannot write checkpoint 4 at {w}/checkpoints/4.orbax-checkpoint-tmp",
            "the half-written checkpoint was removed; ")


class _Full:
    """A file that takes ``writes`` writes, then writes half of the next one and fails."""

    def __init__(self, f, writes, err):
        self.f, self.writes, self.err = f, writes, err

    def write(self, data):
        self.writes -= 1
        if self.writes < 0:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise _fail(self.err)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _metrics(monkeypatch, err):
    """metrics.jsonl fills up halfway through its fourth row."""

    def full_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _Full(f, 3, err) if path.endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(metrics_log, "open", full_open, raising=False)
    return (), "cannot write {w}/metrics.jsonl: ", ""


def _tensorboard(monkeypatch, err):
    from tensorboardX import event_file_writer

    original = event_file_writer.EventsWriter.write_event

    def write_event(self, event):
        if event.step == 3:
            raise _fail(err)
        return original(self, event)

    monkeypatch.setattr(event_file_writer.EventsWriter, "write_event", write_event)
    return (), "cannot write {w}/tensorboard/events.out.tfevents.", ""


class _FailExport(Hook):
    """From the end on (after the final checkpoint), the export's file fails to write."""

    def __init__(self, monkeypatch, err):
        self.monkeypatch, self.err = monkeypatch, err

    def end(self, run):
        real = os.fdopen
        self.monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _Full(real(fd, *a, **k), 0, self.err))


def _export(monkeypatch, err):
    return (_FailExport(monkeypatch, err),), "cannot write {w}/export/optimizer.safetensors: ", ""


def _plot(monkeypatch, err):
    import matplotlib.figure

    def savefig(self, *args, **kwargs):
        raise _fail(err)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return (), "cannot write {w}/plots/meta_loss.png: ", ""


CASES = {  # injection, errno, the outer step it fails at, the last intact checkpoint then
    "checkpoint": (_checkpoint, errno.ENOSPC, 4, 2),
    "checkpoint-permissions": (_checkpoint, errno.EACCES, 4, 2),
    "metrics": (_metrics, errno.ENOSPC, 4, 2),
    "tensorboard": (_tensorboard, errno.ENOSPC, 3, 2),
    "export": (_export, errno.ENOSPC, 6, 6),
    "plot": (_plot, errno.EROFS, 6, 6),
}


# The checkpoint and metrics writes in the fast suite; the others, through the same fault path
# (faults.WriteFailed), with `make test-slow`.
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=() if c in ("checkpoint", "metrics") else pytest.mark.slow)
    for c in CASES])
def test_a_failed_write_is_one_line_and_the_run_resumes(case, tmp_path, monkeypatch, reference):
    """The write fails (checkpoints every 2 steps): train() raises one line naming the path,
    the errno, the free space and the last intact checkpoint, no temporary checkpoint is
    left, and the rerun ends like a run never stopped (rows, TensorBoard, meta-params)."""
    inject, err, step, intact = CASES[case]
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        hooks, where, removed = inject(patch, err)
        with pytest.raises(WriteFailed) as e:
            train(config(num_outer_steps=6), workdir, progress=False, hooks=hooks)
    line = str(e.value)
    assert "\n" not in line, line
    assert line.startswith(where.format(w=workdir)), line
    assert f": {os.strerror(err)} ({errno.errorcode[err]}); " in line, line
    assert " free on /" in line, line
    remedy = {errno.ENOSPC: "free some space", errno.EACCES: "fix the permissions",
              errno.EROFS: "make the filesystem writable"}[err]
    assert line.endswith(f"{removed}the run stopped at outer step {step}; "
                         f"the last intact checkpoint is step {intact} "
                         f"({os.path.join(workdir, 'checkpoints', str(intact))}); {remedy} and rerun "
                         "the same command to resume from it"), line
    left = os.listdir(os.path.join(workdir, "checkpoints"))
    assert not [n for n in left if "tmp" in n], left
    # The cause is gone: the same run resumes from the last intact checkpoint, exactly.
    out = train(config(num_outer_steps=6), workdir, progress=False)
    rows, params, scalars = reference
    assert _rows(workdir) == rows
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(out["state"].meta_params))):
        np.testing.assert_array_equal(a, b)
    got = read_scalars(os.path.join(workdir, "tensorboard"))
    untimed = lambda tags: {t: s for t, s in tags.items() if t not in TIMING}  # noqa: E731
    assert untimed(got) == untimed(scalars)


def test_tensorstore_errors_name_the_file_and_errno():
    """Orbax writes arrays with TensorStore, whose failures are ValueErrors with the errno in
    their text (this one from a 700 KB tmpfs)."""
    text = ('RESOURCE_EXHAUSTED: Error writing "state.meta_params.b/0.0.0" in OCDBT database at local '
            'file "/w/checkpoints/100.orbax-checkpoint-tmp/arrays.orbax-checkpoint-tmp/ocdbt.process_0/": '
            'Failed writing: "/w/checkpoints/100.orbax-checkpoint-tmp/arrays.orbax-checkpoint-tmp/'
            'ocdbt.process_0/d/2207f8": Failed to write 391833 bytes to file 9: No space left on device '
            "[os_error_code='28']")
    try:
        try:
            raise ValueError(text)
        except ValueError as inner:
            raise RuntimeError("orbax's finalize failed") from inner
    except RuntimeError as e:
        failed = faults.os_error(e, "/w/checkpoints/100")
    assert failed.errno == errno.ENOSPC
    assert failed.path.endswith("ocdbt.process_0/d/2207f8")
    assert faults.os_error(ValueError("a bug"), "/w") is None


def test_the_command_says_it_in_one_line_with_exit_code_2(tmp_path):
    """A workdir that cannot be created (its parent is a file): one line, exit 2."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from tests.training.test_reliability import config\n\n\ndef get_config():\n"
                   "    return config()\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lopt.cli.train", f"--config={cfg}", f"--workdir={blocker / 'run'}",
         "--progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "cpu_aot_loader" not in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: cannot write {blocker / 'run'}: Not a directory (ENOTDIR); ")
    assert lines[0].endswith("fix the cause and rerun the same command to resume from it")
