"""Two local processes joined by jax.distributed.initialize on loopback (CPU collectives)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_and_only_process_0_writes(tmp_path):
    port, workdir = _free_port(), tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, LOPT_DATA_DIR=str(tmp_path / "data"))
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # no forced host devices here
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
