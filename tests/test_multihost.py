"""Two local processes joined by jax.distributed.initialize on loopback (CPU collectives)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from lopt.training.hooks import read_metrics
from tests import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_and_only_process_0_writes(tmp_path):
    port, workdir = _free_port(), tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, LOPT_DATA_DIR=str(tmp_path / "data"))
    env["XLA_FLAGS"] = FAST_COMPILE  # no forced host devices here
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_worker", str(port), str(i), str(workdir)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:]))
    assert {r["process"] for r in results} == {0, 1}
    assert all(r["devices"] == 2 for r in results)  # one mesh over both processes' devices
    assert results[0]["sha"] == results[1]["sha"]  # identical meta-params on both hosts
    by_pid = {r["process"]: r for r in results}
    assert by_pid[0]["export"] and by_pid[1]["export"] is None
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(l)["step"] for l in f] == [1, 2, 3]  # written once, not twice
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps[-1] == 3


# --- faults of a two-process run, through the command ---------------------------------------

_CONFIG = """from tests.training.test_reliability import config


def get_config():
    c = config(num_outer_steps={steps}, log_every=1, checkpoint_every={every})
    c.unroll.num_particles = 4  # a pair of antithetic particles per process
    return c
"""


def _command(tmp_path, workdir, port, steps, every, *flags):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(_CONFIG.format(steps=steps, every=every))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env["XLA_FLAGS"] = FAST_COMPILE
    return [
        subprocess.Popen(
            [sys.executable, "-m", "lopt.cli.train", "--multihost", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={i}", f"--config={cfg}", f"--workdir={workdir}",
             "--progress=false", *flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]


def _wait_for_row(procs, workdir, step, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if rows and rows[-1]["step"] >= step:
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process ended early: {p.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no row at step {step} within {timeout} s")


def _last_line(err):
    return [line for line in err.strip().splitlines() if "cpu_aot_loader" not in line][-1]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """JAX's preemption service agrees on the step: SIGTERM to process 1 alone, and both
    processes save that one step, say so in one line and exit 143."""
    workdir = str(tmp_path / "run")
    procs = _command(tmp_path, workdir, _free_port(), 10**6, 10**6)
    try:
        _wait_for_row(procs, workdir, random.randint(3, 30))
        procs[1].send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    lines = [_last_line(e) for e in errs]
    assert [p.returncode for p in procs] == [143, 143], errs[0][-2000:] + errs[1][-2000:]
    m = re.fullmatch(r"stopped by SIGTERM at outer step (\d+) on all 2 processes; checkpoint \1 saved; "
                     r"rerun the same command on every process to resume", lines[0])
    assert m and lines[1] == lines[0], lines
    step = m.group(1)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [step, f"{step}.files.json"]


@pytest.mark.slow  # ~20 s, most of it the heartbeat wait
def test_a_lost_process_is_one_line_on_the_survivor_within_the_heartbeat(tmp_path):
    """kill -9 process 1 mid-run: process 0 does not hang; within --heartbeat_timeout/2 (plus
    a beat) it names the lost process and the last intact checkpoint, and exits 75."""
    workdir = str(tmp_path / "run")
    procs = _command(tmp_path, workdir, _free_port(), 10**6, 5, "--heartbeat_timeout=10")
    try:
        _wait_for_row(procs, workdir, random.randint(6, 30))
        procs[1].kill()
        lost_at = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        took = time.monotonic() - lost_at
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 75, err[-3000:]
    assert took < 30, took
    checkpoints = os.path.join(workdir, "checkpoints")
    last = max(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    assert _last_line(err) == (
        f"error: lost process 1 of 2 (no heartbeat for 5 s); the last intact checkpoint is step {last} "
        f"({checkpoints}/{last}); restart every process with the same command to resume from it")


@pytest.mark.slow  # about 45 s: two two-process runs
def test_after_a_lost_process_a_restart_of_every_process_resumes(tmp_path):
    """The restart procedure of docs/distributed.md: after a lost process, the same command on
    every process resumes from the last intact checkpoint and finishes; the rows read as one
    run (each step once)."""
    workdir = str(tmp_path / "run")
    procs = _command(tmp_path, workdir, _free_port(), 10**6, 5, "--heartbeat_timeout=10")
    try:
        _wait_for_row(procs, workdir, 12)
        procs[1].kill()
        procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 75
    total = read_metrics(os.path.join(workdir, "metrics.jsonl"))[-1]["step"] + 5
    procs = _command(tmp_path, workdir, _free_port(), total, 5, "--heartbeat_timeout=10")
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    steps = [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == list(range(1, total + 1))
