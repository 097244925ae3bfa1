"""``scripts/gpu_check.sh``, the check to run once on a machine with an NVIDIA GPU: its CPU dry
run (every step's command with tiny sizes, and the summary built from their output), and its
one-line refusals (a bad argument; no GPU without ``--dry_run``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = ("suite", "quickstart_train", "quickstart_eval", "w1_default", "w1_fused", "update")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("JAX_PLATFORMS", None)
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# 45-116 s on 2 loaded cores (six processes, each importing JAX and compiling, whose commands
# the fast suite runs elsewhere): with `make test-slow`, to keep `make test` under its budget.
@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    proc = _run("--dry_run", f"--out={tmp_path}")
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-2000:] + proc.stderr[-2000:]
    for step in STEPS:
        assert f"| {step} | passed |" in summary, summary
        assert (tmp_path / f"{step}.log").is_file()
    assert "dry run on the CPU" in summary and "device: cpu" in summary
    assert re.search(r"^suite: \d+ passed", summary, re.M) and "FAILED" not in summary, summary
    assert "done: outer step 2" in summary, summary
    assert summary.count("inner steps/s") >= 2 and "adafac_mlp" in summary and "mlp fused" in summary


def test_bad_argument_is_one_line():
    proc = _run("--dryrun")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown argument '--dryrun'" in proc.stderr


def test_without_a_gpu_it_says_so_and_points_to_the_dry_run(tmp_path):
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("the real check would run here: not a fast test")
    proc = _run(f"--out={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "--dry_run" in proc.stderr
