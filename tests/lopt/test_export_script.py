"""scripts/export.py: a training checkpoint becomes an export file (function and command line)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from lopt import export
from lopt.training import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "export.py")


def _load_script():
    from lopt.cli import export as module

    return module


def _tiny_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_outer_steps = 3
    c.log_every = 1
    c.checkpoint_every = 2
    c.task = ConfigDict(dict(name="quadratic", dim=4))
    c.lopt = ConfigDict(dict(name="hyper_adam", init_learning_rate=3e-3))
    c.estimator = ConfigDict(dict(name="pes", std=0.01))
    c.meta_optimizer = ConfigDict(dict(name="adam", learning_rate=1e-2, clip_grad_norm=None))
    c.unroll = ConfigDict(
        dict(num_particles=4, trunc_length=3, horizon=ConfigDict(dict(name="constant", length=7)))
    )
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    summary = train(_tiny_config(), path, progress=False)
    return path, summary


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_export_latest_and_given_step(workdir, tmp_path):
    path, summary = workdir
    script = _load_script()
    latest = script.export_checkpoint(path)
    assert latest == os.path.join(path, "export", "optimizer_step3.safetensors")
    assert export.read_metadata(latest)["format_version"] == 2
    learned_opt, meta_params = export.load(latest)
    assert learned_opt.name == "hyper_adam" and learned_opt.init_learning_rate == 3e-3
    assert _leaves_equal(meta_params, summary["state"].meta_params)
    _, final = export.load(summary["export"])  # what train() exported itself
    assert _leaves_equal(meta_params, final)
    header = export.read_metadata(latest)["metadata"]
    assert header["outer_step"] == 3 and header["checkpoint_step"] == 3
    assert header["task"]["name"] == "quadratic"

    earlier = script.export_checkpoint(path, out=str(tmp_path / "two.safetensors"), step=2)
    assert earlier == str(tmp_path / "two.safetensors")
    assert export.read_metadata(earlier)["metadata"]["outer_step"] == 2
    _, meta_params_2 = export.load(earlier)
    assert not _leaves_equal(meta_params_2, meta_params)


def test_missing_step_and_workdir(workdir, tmp_path):
    path, _ = workdir
    script = _load_script()
    with pytest.raises(script.ExportScriptError, match=r"step 5; available: \[2, 3\]"):
        script.export_checkpoint(path, step=5)
    with pytest.raises(script.ExportScriptError, match="config.json"):
        script.export_checkpoint(str(tmp_path))


def test_command_line(workdir, tmp_path):
    path, _ = workdir
    out = tmp_path / "cli.safetensors"
    run = subprocess.run(
        [sys.executable, SCRIPT, f"--workdir={path}", f"--out={out}", "--step=2"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "exported hyper_adam (outer step 2)" in run.stdout
    assert export.read_metadata(out)["metadata"]["checkpoint_step"] == 2
    bad = subprocess.run(
        [sys.executable, SCRIPT, f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2 and "config.json" in bad.stderr


def test_kept_checkpoints_export_and_others_are_named(tmp_path):
    """checkpoint_keep newest plus every checkpoint_keep_every-th step survive (orbax's
    preservation policies); an earlier step is a one-line error listing the kept ones."""
    c = _tiny_config()
    c.num_outer_steps, c.checkpoint_every = 7, 1
    c.checkpoint_keep, c.checkpoint_keep_every = 2, 3
    path = str(tmp_path / "run")
    train(c, path, progress=False)
    kept = sorted(int(d) for d in os.listdir(os.path.join(path, "checkpoints")) if d.isdigit())
    assert kept == [3, 6, 7]
    script = _load_script()
    out = script.export_checkpoint(path, out=str(tmp_path / "three.safetensors"), step=3)
    assert export.read_metadata(out)["metadata"]["outer_step"] == 3
    with pytest.raises(script.ExportScriptError) as e:
        script.export_checkpoint(path, step=4)
    assert "\n" not in str(e.value) and "step 4; available: [3, 6, 7]" in str(e.value)
