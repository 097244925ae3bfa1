"""What a run writes for people to read: TensorBoard event files (no TensorFlow) holding every
logged scalar of metrics.jsonl, curriculum decisions included."""

from __future__ import annotations

import json
import os

import pytest
from ml_collections import ConfigDict

from lopt.training import train
from lopt.training.tensorboard import read_scalars


def test_tensorboard_event_files_hold_every_logged_scalar(tmp_path):
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 8
    c.log_every = 2
    c.checkpoint_every = 4
    c.task = ConfigDict(dict(name="quadratic", dim=3))
    c.lopt = ConfigDict(dict(name="hyper_adam"))
    c.estimator = ConfigDict(dict(name="merged", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=1e-2))
    c.unroll = ConfigDict(dict(num_particles=4, trunc_length=2, horizon=ConfigDict(dict(name="constant", length=4))))
    c.curriculum = ConfigDict(dict(stages=(2, 4), period=1, min_periods=1, max_periods=2, valid_seeds=2))
    train(c, str(tmp_path), progress=False)
    scalars = read_scalars(os.path.join(str(tmp_path), "tensorboard"))
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
    for name in ("meta_loss", "grad_norm", "num_skipped", "es_share", "inner_steps_per_sec",
                 "position_mean", "position_max", "clipped_share"):
        logged = [(r["step"], r[name]) for r in rows if r.get(name) is not None and "decision" not in r]
        assert logged, name
        assert scalars[f"meta/{name}"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged], name
    decisions = [(r["step"], r["valid_loss"]) for r in rows if "decision" in r]
    assert decisions and scalars["curriculum/valid_loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in decisions]
    assert {s for s, _ in scalars["curriculum/curriculum_stage"]} <= {s for s, _ in decisions}


class _EveryStep:
    """A hook that keeps every outer step's metrics."""

    def __init__(self):
        self.steps = []

    def start(self, run):
        pass

    def after_step(self, run, metrics):
        import jax

        self.steps.append(jax.device_get(metrics))

    def end(self, run):
        pass

    def checkpoint_items(self, run):
        return {}, {}

    def restore_items(self, run, items, host):
        pass


def test_a_log_row_summarises_every_step_since_the_last_row(tmp_path):
    """With log_every = horizon / trunc_length every row lands at the same phase of the
    trajectories; the row must describe all the steps in between, not that phase alone."""
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 6
    c.log_every = 3
    c.checkpoint_every = 6
    c.task = ConfigDict(dict(name="quadratic", dim=3))
    c.lopt = ConfigDict(dict(name="hyper_adam"))
    c.estimator = ConfigDict(dict(name="pes", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=1e-2))
    c.unroll = ConfigDict(dict(num_particles=2, trunc_length=2, stagger=False,
                               horizon=ConfigDict(dict(name="constant", length=6))))
    every = _EveryStep()
    train(c, str(tmp_path), progress=False, hooks=(every,))
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [3, 6] and len(every.steps) == 6
    for row, window in zip(rows, (every.steps[:3], every.steps[3:])):
        losses = [float(m["meta_loss"]) for m in window]
        assert len(set(losses)) == 3  # the three phases differ, so a one-step row would differ
        assert row["meta_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
        assert row["position_mean"] == pytest.approx(sum(float(m["position_mean"]) for m in window) / 3)
        assert row["position_max"] == max(float(m["position_max"]) for m in window)
        assert row["inner_steps"] == sum(int(m["inner_steps"]) for m in window)
        assert row["num_skipped"] == int(window[-1]["num_skipped"])
    assert rows[-1]["inner_steps_total"] == 6 * 2 * 2


def test_a_metric_is_averaged_over_the_steps_it_applies_to():
    """Imitation steps (Chen et al. 2020 Alg. 2) have no meta-loss and meta-loss steps no
    imitation loss: each is NaN where it does not apply. A row's meta_loss is the mean over its
    meta-loss steps only (averaging the other steps in as 0 would report a meta-loss that no
    step had), counts still sum over every step, and a metric that applied at no step of the
    window is left out of the row."""
    from lopt.training.loop import window_row

    nan = float("nan")
    window = [
        {"meta_loss": 2.0, "imitation_loss": nan, "inner_steps": 4, "position_max": 3.0, "imitation": 0.0},
        {"meta_loss": nan, "imitation_loss": 9.0, "inner_steps": 4, "position_max": nan, "imitation": 1.0},
        {"meta_loss": 1.0, "imitation_loss": nan, "inner_steps": 4, "position_max": 5.0, "imitation": 0.0},
    ]
    row = window_row(window)
    assert row["meta_loss"] == pytest.approx(1.5)
    assert row["imitation_loss"] == pytest.approx(9.0)
    assert row["inner_steps"] == 12 and row["position_max"] == 5.0
    assert row["imitation"] == pytest.approx(1 / 3)
    assert "imitation_loss" not in window_row([window[0], window[2]])


def test_the_progress_bar_shows_stability_beside_the_meta_loss():
    """With a meta-loss clip ES/PES never skip a step, so the non-finite and clipped shares are
    the stability signal: the bar shows both beside the meta-loss, zeros included; a window of
    imitation steps (no shares) shows neither."""
    from lopt.training.metrics_log import _postfix

    bar = _postfix({"meta_loss": 0.5, "nonfinite_share": 0.0, "clipped_share": 0.25, "num_skipped": 0})
    assert bar == {"meta_loss": "0.5", "nonfinite": "0%", "clipped": "25%"}
    assert list(_postfix({"meta_loss": 0.5, "nonfinite_share": 0.5, "clipped_share": 1.0}))[:3] == \
        ["meta_loss", "nonfinite", "clipped"]
    assert _postfix({"imitation_loss": 1.0, "num_skipped": 2}) == {"meta_loss": "nan", "skipped": 2}


def test_the_event_writer_does_not_import_torch(tmp_path):
    """tensorboardX's package imports torch where it is installed (~1 s a run, for nothing):
    the writer imports tensorboardX without it, and torch stays importable afterwards."""
    import subprocess
    import sys

    code = ("import sys; from lopt.training.tensorboard import Writer, read_scalars\n"
            f"w = Writer({str(tmp_path)!r}); w.row({{'step': 1, 'meta_loss': 0.5}}); w.close()\n"
            f"assert read_scalars({str(tmp_path)!r}) == {{'meta/meta_loss': [(1, 0.5)]}}\n"
            "print('torch' in sys.modules)\n"
            "try:\n    import torch\nexcept ImportError as e:\n    assert 'No module named' in str(e), e\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
