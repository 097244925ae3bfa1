"""scripts/ablate.py end to end on a tiny budget (tuned AdamW, LO naive, LO + curriculum,
ELO-LO; evaluated at H and a multiple of H), its reuse of finished runs, and its flag checks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from tests import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "ablate.py")

H, FACTOR, OUTER, SEEDS = 8, 3, 6, 2
LRS = (1e-3, 1e-2)
TINY = [
    "--set=task.hidden_sizes=(4,)", "--set=task.batch_size=8", "--set=lopt.hidden_size=4",
    "--set=lopt.hidden_layers=1", "--set=unroll.num_particles=2",
    f"--set=unroll.trunc_length={H}", "--set=unroll.replay.capacity=2",
    "--set=unroll.behaviour_cloning.schedule.steps=4", f"--outer_steps={OUTER}",
    f"--seeds={SEEDS}", f"--factor={FACTOR}", "--lrs=" + ",".join(map(str, LRS)),
    "--cl_period=1", "--cl_max_periods=2", "--noprogress",
]
# The run is all compilation: the tests' fast compile flags (tests.FAST_COMPILE) make it much faster.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)


def _run(args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ablate"))
    proc = _run([f"--out={out}", *TINY])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f), proc.stdout


def test_table_results_and_plot(tiny):
    out, results, stdout = tiny
    for name in ("table.md", "results.json", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    methods = results["methods"]
    assert list(methods) == ["adamw", "naive", "curriculum", "elo"]
    assert results["horizon"] == H and results["long_horizon"] == FACTOR * H
    table = open(os.path.join(out, "table.md")).read()
    for label in ("AdamW", "LO naive", "LO + curriculum", "ELO-LO"):
        assert label in table and label in stdout
    assert f"test acc @ H={H}" in table and f"@ {FACTOR}H={FACTOR * H}" in table
    assert "Command: python scripts/ablate.py" in table
    for method, r in methods.items():
        for length in (str(H), str(FACTOR * H)):
            e = r["eval"][length]
            assert len(e["test_accuracy"]["per_seed"]) == SEEDS, (method, length)
            assert all(0.0 <= a <= 1.0 for a in e["test_accuracy"]["per_seed"])
            assert math.isfinite(e["test_loss"]["mean"])
            assert len(e["train_loss_curve_mean"]) == int(length)
    # AdamW's learning rate is tuned per evaluation length, from the grid.
    assert all(methods["adamw"]["eval"][n]["best_lr"] in LRS for n in (str(H), str(FACTOR * H)))
    # ... on instances the table does not report: the sweep's figure at the chosen rate (tuning
    # instances) is not the reported one (evaluation instances).
    assert not set(results["adamw_tune_seeds"]) & set(results["eval_seeds"])
    for n in (str(H), str(FACTOR * H)):
        e = methods["adamw"]["eval"][n]
        sweep = {float(k): v for k, v in e["lr_sweep"].items()}
        assert e["best_lr"] == min(sweep, key=sweep.get)
        assert sweep[e["best_lr"]] != pytest.approx(e["final_train_loss"]["mean"], rel=1e-6)


def test_learned_optimizers_share_the_setup_but_the_techniques(tiny):
    out, results, _ = tiny
    m = results["methods"]
    naive, cl, elo = (m[k]["config"] for k in ("naive", "curriculum", "elo"))
    assert not naive["unroll"]["replay"]["enabled"] and not naive["unroll"]["behaviour_cloning"]["enabled"]
    assert elo["unroll"]["replay"]["enabled"] and elo["unroll"]["behaviour_cloning"]["enabled"]
    assert "curriculum" not in naive and cl["curriculum"]["stages"] == [H // 4, H // 2, H]
    for k in ("task", "lopt", "estimator", "meta_optimizer", "num_outer_steps"):
        assert naive[k] == elo[k] == cl[k], k
    for method in ("naive", "elo"):
        (run,) = m[method]["runs"]
        assert run["outer_steps"] == OUTER and run["inner_steps"] == OUTER * 2 * H
        assert os.path.exists(run["export"])
    (run,) = m["curriculum"]["runs"]
    assert 1 <= run["outer_steps"] <= OUTER
    decisions = run["curriculum"]
    assert decisions[0]["validation"] == "baseline" and decisions[0]["train_length"] == H // 4
    assert decisions[0]["curriculum_stage"] == 0
    for d in decisions:
        assert d["train_length"] == [H // 4, H // 2, H][d["curriculum_stage"]]
    assert {d["train_length"] for d in decisions} <= {H // 4, H // 2, H}


def test_rerun_reuses_finished_runs(tiny):
    out, results, _ = tiny
    proc = _run([f"--out={out}", "--methods=curriculum,naive", *TINY])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)["methods"]
    assert list(again) == ["naive", "curriculum"]  # table order, not the flag's
    for method in again:
        assert again[method]["runs"][0]["reused"]
        assert again[method]["eval"] == results["methods"][method]["eval"]  # same exports, same keys


SLOW = pytest.mark.slow


# Each case is a ~2 s subprocess that compiles nothing: every third runs in the fast suite,
# the others with `make test-slow`.
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--methods=adamw,sgd"], "unknown sgd"),
        pytest.param(["--set=unroll.particles=4"], "no key unroll.particles", marks=SLOW),
        pytest.param(["--set=optimizer.lr=1"], "no section optimizer", marks=SLOW),
        (["--set=seed"], "key=value"),
        pytest.param(["--set=unroll.num_particles=four"], "unroll.num_particles", marks=SLOW),
        pytest.param(["--cl_stages=8,4"], "increasing", marks=SLOW),
        (["--cl_period=0"], "--cl_period >= 1"),
        pytest.param(["--set=unroll.horizon.name=linear"], "constant meta-training horizon", marks=SLOW),
        pytest.param(["--lrs=0.1,-1"], "positive", marks=SLOW),
        (["--seeds=0"], "--seeds must be >= 1"),
        pytest.param(["--tune_seed_offset=1000001"], "overlapping instances", marks=SLOW),
        pytest.param(["--nonsense=1"], "nonsense", marks=SLOW),
        (["--elo_config=elo_mnistt"], "--elo_config: no shipped config named 'elo_mnistt' (shipped: "),
        pytest.param(["--naive_config=nowhere/naive.py"], "--naive_config: no such config file: nowhere/naive.py", marks=SLOW),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, args, needle):
    proc = _run([f"--out={tmp_path}", *args], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not os.listdir(tmp_path)  # nothing ran


def test_an_out_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _run([f"--out={tmp_path / 'file' / 'out'}"], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --out: cannot create ") and proc.stderr.count("\n") == 1


def test_mnist_configs_without_mnist_say_how_to_provide_it(tmp_path):
    """The MNIST configs prepare ``mnist`` from $LOPT_MNIST_SOURCE; a source that is not there
    is one line naming the variable, before anything trains."""
    env = dict(ENV, LOPT_DATA_DIR=str(tmp_path / "data"), LOPT_MNIST_SOURCE=str(tmp_path / "raw"))
    proc = subprocess.run([sys.executable, SCRIPT, "--elo_config=elo_mnist", "--naive_config="
                           "naive_mnist", f"--out={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: the mnist dataset is "
                                                                   "not prepared"), proc.stderr
    assert f"$LOPT_MNIST_SOURCE ({tmp_path / 'raw'}) is not a directory" in proc.stderr
