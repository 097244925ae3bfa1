"""Tests for lopt.evaluation and scripts/evaluate.py (tiny tasks, few steps)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
import tasks
from lopt import export
from lopt.training import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "evaluate.py")
STEPS = 25
SEEDS = 3
# One optimizer object for all quadratic runs: train_curves caches its compiled program on it.
SGD = optax.sgd(0.1)


def _keys(n: int = SEEDS, offset: int = 1_000_000) -> jax.Array:
    return jnp.stack([jax.random.PRNGKey(offset + i) for i in range(n)])


@pytest.fixture(scope="module")
def quadratic():
    return tasks.get("quadratic", dim=4)


@pytest.fixture(scope="module")
def digits():
    return tasks.get("digits_mlp", hidden_sizes=(8,), batch_size=16)


@pytest.fixture(scope="module")
def sgd_quadratic(quadratic):
    return evaluation.train_curves(quadratic, SGD, _keys(), STEPS)


def test_train_curves_shapes_and_progress(sgd_quadratic):
    r = sgd_quadratic
    assert r["train_loss"].shape == (SEEDS, STEPS)
    for k in ("final_train_loss", "test_loss"):
        assert r[k].shape == (SEEDS,)
        assert np.all(np.isfinite(r[k]))
    assert r["test_accuracy"] is None  # quadratic's aux has no accuracy
    assert r["final_train_loss"].mean() < r["train_loss"][:, 0].mean()
    np.testing.assert_allclose(
        r["final_train_loss"], r["train_loss"][:, -evaluation.FINAL_WINDOW :].mean(1), rtol=1e-5
    )


def test_train_curves_deterministic(quadratic, sgd_quadratic):
    again = evaluation.train_curves(quadratic, SGD, _keys(), STEPS)
    for k in ("train_loss", "final_train_loss", "test_loss"):
        np.testing.assert_array_equal(again[k], sgd_quadratic[k])
    other = evaluation.train_curves(quadratic, SGD, _keys(offset=7), STEPS)
    assert not np.array_equal(other["train_loss"], sgd_quadratic["train_loss"])


def test_learned_optimizer_and_short_runs(quadratic):
    """An ExtraArgs optimizer (gets loss=...) trains; with < 10 steps the final train loss is
    the mean over all steps."""
    learned_opt = lopt.get("mlp", hidden_size=4, hidden_layers=1)
    opt = learned_opt.optimizer(learned_opt.init(jax.random.PRNGKey(0)))
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    r = evaluation.train_curves(quadratic, opt, _keys(2), 4)
    assert r["train_loss"].shape == (2, 4)
    assert np.all(np.isfinite(r["test_loss"]))
    np.testing.assert_allclose(r["final_train_loss"], r["train_loss"].mean(1), rtol=1e-5)


def test_digits_has_accuracy(digits):
    r = evaluation.train_curves(digits, optax.adam(1e-2), _keys(), STEPS)
    acc = r["test_accuracy"]
    assert acc is not None and acc.shape == (SEEDS,)
    assert np.all((acc >= 0) & (acc <= 1))
    assert np.all(np.isfinite(r["test_loss"]))


def test_tune_adam_picks_best_and_survives_divergence(quadratic):
    lrs = (1e-3, 1e-2, 1e-1, 1e3, 1e30)  # 1e30 overflows to inf/NaN
    best, results = evaluation.tune_adam(quadratic, _keys(), STEPS, lrs)
    assert set(results) == set(lrs)
    means = {lr: float(np.mean(r["final_train_loss"])) for lr, r in results.items()}
    assert not math.isfinite(means[1e30])  # really diverged
    assert best not in (1e3, 1e30)
    finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
    assert best == min(finite, key=finite.get)
    # A NaN (not just inf) mean ranks last too.
    assert evaluation._rank_value(np.array([np.nan, 0.0])) == math.inf
    for r in results.values():
        assert r["train_loss"].shape == (SEEDS, STEPS)
        assert r["test_accuracy"] is None


def test_tune_adamw_is_decoupled_weight_decay(quadratic):
    """``weight_decay`` tunes AdamW: each grid entry equals optax.adamw at that rate, and the
    decay changes the trajectory (so it is not silently plain Adam)."""
    lrs, wd = (1e-2, 1e-1), 0.5
    _, adamw = evaluation.tune_adam(quadratic, _keys(), STEPS, lrs, weight_decay=wd)
    _, adam = evaluation.tune_adam(quadratic, _keys(), STEPS, lrs)
    direct = evaluation.train_curves(quadratic, optax.adamw(1e-1, weight_decay=wd), _keys(), STEPS)
    np.testing.assert_allclose(adamw[1e-1]["train_loss"], direct["train_loss"], rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(adamw[1e-1]["train_loss"][:, -1] - adam[1e-1]["train_loss"][:, -1])) > 1e-3
    with pytest.raises(ValueError, match="weight_decay"):
        evaluation.tune_adam(quadratic, _keys(), STEPS, lrs, weight_decay=-1.0)


def test_default_lrs():
    assert len(evaluation.DEFAULT_LRS) >= 7
    assert evaluation.DEFAULT_LRS[0] == pytest.approx(1e-4)
    assert evaluation.DEFAULT_LRS[-1] == pytest.approx(1e-1)


def test_format_table_and_plot(tmp_path, sgd_quadratic):
    rows = {
        "sgd": sgd_quadratic,
        "diverged": {
            "train_loss": np.full((2, STEPS), np.nan),
            "final_train_loss": np.array([np.nan, np.inf]),
            "test_loss": np.array([np.inf, np.inf]),
            "test_accuracy": np.array([0.1, 0.2]),
        },
    }
    table = evaluation.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4
    assert "optimizer" in lines[0] and "test accuracy" in lines[0]
    assert lines[2].startswith("sgd") and "±" in lines[2]
    assert lines[2].rstrip().endswith("-")  # no accuracy for quadratic
    path = evaluation.plot_curves(
        {k: r["train_loss"] for k, r in rows.items()}, tmp_path / "c.png", "title"
    )
    assert os.path.getsize(path) > 1000
    marked = evaluation.plot_curves(
        {k: r["train_loss"] for k, r in rows.items()}, tmp_path / "m.png", "title",
        vlines={"horizon": 10}, log_x=True,
    )
    with open(path, "rb") as a, open(marked, "rb") as b:
        assert a.read() != b.read()  # the marks and the log axis are drawn


@pytest.fixture(scope="module")
def export_path(tmp_path_factory):
    learned_opt = lopt.get("mlp", hidden_size=4, hidden_layers=1)
    meta_params = learned_opt.init(jax.random.PRNGKey(0))
    path = tmp_path_factory.mktemp("export") / "optimizer.safetensors"
    export.save(path, learned_opt, meta_params)
    return str(path)


def _script(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, **kwargs,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


@pytest.fixture(scope="module", autouse=True)
def script_run(export_path, tmp_path_factory):
    """The end-to-end script run, started when this module's first test starts so that it runs
    beside the in-process tests (it is mostly compilation)."""
    out = tmp_path_factory.mktemp("eval") / "out"
    proc = _script(
        f"--export={export_path}", "--task=quadratic", '--task_kwargs={"dim": 4}',
        "--steps=10", "--seeds=2", "--lrs=1e-3,1e-2", f"--out={out}",
    )
    result = {}

    def get():
        if not result:
            result["rc"], result["stdout"], result["stderr"] = _finish(proc)
            result["out"] = out
        return result

    yield get
    get()  # never leave the child running


def test_script_end_to_end(script_run):
    r = script_run()
    assert r["rc"] == 0, r["stderr"][-2000:]
    assert "adam (lr=" in r["stdout"] and "learned (mlp)" in r["stdout"]
    out = r["out"]
    results = json.loads((out / "results.json").read_text())
    for key in ("learned_optimizer", "adam", "best_lr", "adam_sweep", "flags", "seeds"):
        assert key in results
    assert results["best_lr"] in (1e-3, 1e-2)
    assert results["flags"]["task_kwargs"] == {"dim": 4}
    assert results["flags"]["lrs"] == [1e-3, 1e-2]
    assert results["seeds"] == [1_000_000, 1_000_001]
    # Adam is tuned on other instances than it is reported on: its reported figure at the
    # chosen rate is not the sweep's (tuning instances) figure at that rate.
    assert results["adam_tune_seeds"] == [3_000_000, 3_000_001]
    swept = results["adam_sweep"][repr(results["best_lr"])]["final_train_loss"]["mean"]
    assert swept != pytest.approx(results["adam"]["final_train_loss"]["mean"], rel=1e-6)
    learned = results["learned_optimizer"]
    assert len(learned["final_train_loss"]["per_seed"]) == 2
    assert len(learned["train_loss"][0]) == 10
    assert learned["test_accuracy"] is None
    assert (out / "curves.png").stat().st_size > 1000
    assert str(out / "results.json") in r["stdout"]
    from lopt.training.tensorboard import read_scalars

    scalars = read_scalars(str(out / "tensorboard"))  # the evaluation curves, per optimizer
    assert len(scalars["eval/learned_mlp/train_loss"]) == 10
    assert [s for s, _ in scalars["eval/learned_mlp/test_loss"]] == list(range(1, 11))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--export=/nonexistent/optimizer.safetensors"], "not found"),
        (["--task_kwargs={bad json"], "JSON"),
        (["--task=no_such_task"], "no_such_task"),
    ],
)
def test_script_bad_inputs(tmp_path, export_path, args, needle):
    base = [f"--export={export_path}", "--task=quadratic", f"--out={tmp_path}", "--steps=2"]
    rc, _, err = _finish(_script(*base, *args))  # later flags override earlier ones
    assert rc == 2, err[-2000:]
    err = err.strip()
    assert "Traceback" not in err
    assert needle in err.splitlines()[-1]
    assert len(err.splitlines()[-1]) < 300


def test_trailing_mean_matches_a_direct_window_mean():
    """The plot smoothing: step t is the mean of the last max(1, f t) finite values."""
    rng = np.random.default_rng(0)
    c = rng.normal(size=(3, 50))
    c[1, 7] = c[2, 20:30] = np.nan
    f = 0.3
    got = evaluation._trailing_mean(c, f)
    for s in range(3):
        for t in range(50):
            w = max(1, int(f * t))
            window = c[s, t - w + 1 : t + 1]
            want = np.nanmean(window) if np.isfinite(window).any() else np.nan
            np.testing.assert_allclose(got[s, t], want, rtol=1e-12, equal_nan=True)
