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
