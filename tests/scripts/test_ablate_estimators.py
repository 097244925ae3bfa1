"""scripts/ablate_estimators.py end to end on a tiny budget: two estimators whose outer steps
cost different numbers of inner steps (pes: a truncation, full_es: whole trajectories) get the
same inner-step budget, and the table, results and plot are written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "ablate_estimators.py")

PARTICLES, TRUNC, HORIZON = 4, 4, 8  # pes: 16 inner steps an outer step, full_es: 32
BUDGET = 96


def test_tiny_ablation(tmp_path):
    workdir = str(tmp_path / "ablation")
    cmd = [
        sys.executable, SCRIPT, f"--workdir={workdir}", "--estimators=pes,full_es",
        f"--inner_steps={BUDGET}", "--eval_steps=4", "--eval_seeds=2", "--noadam_baseline",
        "--noprogress",
        "--config.task.hidden_sizes=(4,)", "--config.task.batch_size=8",
        "--config.lopt.hidden_size=4", "--config.lopt.hidden_layers=1",
        f"--config.unroll.num_particles={PARTICLES}", f"--config.unroll.trunc_length={TRUNC}",
        f"--config.unroll.horizon.length={HORIZON}", "--config.checkpoint_every=100",
    ]
    # The run is all compilation: the tests' fast compile flags (tests.FAST_COMPILE; -O0 alone made it ~2.5x faster).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    for name in ("table.md", "results.json", "meta_loss.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    runs = results["estimators"]
    assert list(runs) == ["pes", "full_es"]  # the config's table order, not the flag's

    # The outer-step cost comes from the config, so both runs hit the budget (within one step).
    assert runs["pes"]["inner_steps_per_outer_step"] == PARTICLES * TRUNC
    assert runs["full_es"]["inner_steps_per_outer_step"] == PARTICLES * HORIZON
    assert runs["pes"]["outer_steps"] == BUDGET // (PARTICLES * TRUNC)
    assert runs["full_es"]["outer_steps"] == BUDGET // (PARTICLES * HORIZON)
    for name, r in runs.items():
        assert abs(r["inner_steps"] - BUDGET) <= r["inner_steps_per_outer_step"], name
        # Counted by the trainer itself (metrics.jsonl), not by the script's arithmetic.
        with open(os.path.join(workdir, name, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert rows[-1]["inner_steps_total"] == r["inner_steps"]
        assert os.path.exists(os.path.join(workdir, name, "export", "optimizer.safetensors"))
        for value in (r["final_meta_loss"], r["inner_steps_per_sec"],
                      r["eval"]["test_loss"]["mean"], r["eval"]["test_accuracy"]["mean"]):
            assert value is not None and math.isfinite(value), (name, value)
        assert len(r["eval"]["test_loss"]["per_seed"]) == 2
        assert r["curve"]["inner_steps"] == [row["inner_steps_total"] for row in rows]

    table = open(os.path.join(workdir, "table.md")).read()
    assert "| pes " in table and "| full_es " in table and "held-out eval loss" in table
    assert "| pes " in proc.stdout  # the table is printed too
