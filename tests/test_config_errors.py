"""Every bad config key or value fails before anything compiles or is written: one line
``config error: config.<path>: <what is wrong>; ...``, exit code 2, no compile (JAX logs every
compile to stderr here, so one line on stderr means none ran), and no workdir.

Each case runs ``scripts/meta_train.py --config=configs/quickstart.py`` with one bad override,
as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "meta_train.py")

CASES = [
    ("unroll.trunc_length=0", "config.unroll.trunc_length: must be an integer >= 1"),
    ("unroll.trunc_length=abc", "config.unroll.trunc_length: cannot read 'abc'"),
    ("unroll.num_particles=0", "config.unroll.num_particles: must be an integer >= 1"),
    ("unroll.num_particles=7", "config.unroll.num_particles: PES runs antithetic"),
    ("estimator.std=-1", "config.estimator: PES: std must be positive"),
    ("estimator.name=pess", "config.estimator: unknown estimator 'pess'. Did you mean 'pes'"),
    ("task.batch_size=0", "config.task: digits_mlp: batch_size"),
    ("task.activation=swish", "config.task: digits_mlp: unknown activation 'swish'"),
    ("task.name=digit_mlp", "config.task: unknown task family 'digit_mlp'. Did you mean 'digits_mlp'"),
    ("task.permute_classes=maybe", "config.task.permute_classes: cannot read 'maybe'"),
    ("task.dataset=idx:/x", "config.task.dataset: the config file has no such key"),
    ("task.hidden_sizez=3", "config.task.hidden_sizez: the config file has no such key"),
    ("lopt.hidden_size=0", "config.lopt: mlp: hidden_size must be >= 1"),
    ("lopt.name=mlpp", "config.lopt: unknown learned optimizer 'mlpp'"),
    ("meta_optimizer.learning_rate=-1", "config.meta_optimizer.learning_rate: must be a positive"),
    ("meta_optimizer.clip_grad_norm=-3.0", "config.meta_optimizer.clip_grad_norm: must be None"),
    ("meta_optimizer.name=adamm", "config.meta_optimizer.name: optax has no optimizer 'adamm'"),
    ("unroll.meta_loss.split=test", "config.unroll.meta_loss: meta_loss.split must be"),
    ("unroll.meta_loss.clip=-1.0", "config.unroll.meta_loss: meta_loss.clip must be None or positive"),
    ("unroll.horizon.length=0", "config.unroll.horizon: constant schedule: length must be >= 1"),
    ("num_outer_steps=0", "config.num_outer_steps: must be an integer >= 1"),
    ("log_every=0", "config.log_every: must be an integer >= 1"),
    ("checkpoint_every=-5", "config.checkpoint_every: must be an integer >= 1"),
    ("seed=-1", "config.seed: must be an integer >= 0"),
    ("checkpoint_keep=0", "config.checkpoint_keep: must be an integer >= 1"),
    ("checkpoint_keep_every=-3", "config.checkpoint_keep_every: must be an integer >= 0"),
    # (--cpu_devices=auto may show this CPU as several devices: the count is not checked)
    ("num_devices=5", "config.num_devices: num_devices=5 but only "),
]


def _run(override: str, tmp_path, env=None, args=()):
    workdir = tmp_path / "run"
    env = {"JAX_LOG_COMPILES": "1", **(env or {})}  # a compile would add lines to stderr
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--config=configs/quickstart.py", f"--workdir={workdir}",
         f"--config.{override}", "--noprogress", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, **env),
    )
    return proc, time.perf_counter() - t0, workdir


def _every_third(cases, key=lambda c: c[0]):
    """Each case is a subprocess of ~2 s (Python and JAX starting) that compiles nothing: every
    third runs in the fast suite, the others with ``make test-slow`` (the same code path)."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), id=key(c),
                         marks=() if i % 3 == 0 else pytest.mark.slow)
            for i, c in enumerate(cases)]


@pytest.mark.parametrize("override,message", _every_third(CASES))
def test_bad_value_is_one_line_before_anything_runs(override, message, tmp_path):
    proc, seconds, workdir = _run(override, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), proc.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not workdir.exists() and os.listdir(tmp_path) == []


EVAL_CASES = [
    ("eval.every=0", "config.eval: every must be an int >= 1"),
    ("eval.baseline=sgd", "config.eval: baseline must be one of ('adam', 'none')"),
    ("eval.lengths=(200,0)", "config.eval: lengths must be distinct ints >= 1"),
]


@pytest.mark.parametrize("override,message", _every_third(EVAL_CASES))
def test_bad_eval_value_is_one_line_before_anything_runs(override, message, tmp_path):
    proc, _, workdir = _run(override, tmp_path, args=["--config.eval.enabled=True"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not workdir.exists()


BAD_FILES = {
    "missing": (None, "no such config file", ()),
    "missing+override": (None, "no such config file", ("--config.seed=1",)),
    "syntax": ("def get_config(:\n", "SyntaxError: invalid syntax (line 1)", ()),
    "raises": ("def get_config():\n    raise ValueError('boom')\n",
               "get_config() raised ValueError: boom", ()),
    "raises-other": ("def get_config():\n    raise RuntimeError('boom')\n",
                     "RuntimeError: boom", ()),
    "bad-import": ("import no_such_module_anywhere\n",
                   "ModuleNotFoundError: No module named 'no_such_module_anywhere'", ()),
    # ml_collections defers an OSError of get_config() to the config's first use.
    "oserror+override": ("def get_config():\n    open('/no/such/file')\n",
                         "FileNotFoundError: [Errno 2]", ("--config.seed=1",)),
}


@pytest.mark.parametrize("name", _every_third(list(BAD_FILES), key=str))
def test_bad_config_file_is_one_line(name, tmp_path):
    """ml_collections defers a config file's load failure to first use or wraps it in a
    traceback; the user sees one line naming the file."""
    text, message, args = BAD_FILES[name]
    path = tmp_path / "my_config.py"
    if text is not None:
        path.write_text(text)
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, SCRIPT, f"--config={path}", f"--workdir={workdir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: --config"), proc.stderr[-2000:]
    assert message in lines[0] and ("my_config.py" in lines[0]), lines[0]
    assert not workdir.exists()


@pytest.mark.parametrize("value", ["quickstart", "configs/quickstart.py"])
def test_a_shipped_config_by_name_from_any_directory(value, tmp_path):
    """Run where there is no configs/ (as from an installed package): the shipped config
    loads, its override applies (and is rejected: nothing trains)."""
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, SCRIPT, f"--config={value}", f"--workdir={workdir}",
                           "--config.seed=-1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "config error: config.seed: must be an integer >= 0, got -1"


def test_an_unknown_config_name_lists_the_shipped_ones(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--config=quickstrat", "--config.seed=1",
                           f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("config error: --config: no shipped config named 'quickstrat' "
                               "(shipped: ablate_estimators, chen2020_cl, "), lines[0]
    assert "quickstart" in lines[0] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("how", ["xla_flags", "cpu_devices"])
def test_particles_split_into_whole_pairs_per_device(how, tmp_path):
    """8 particles on 8 devices is one per device: a pair cannot be split (the message says
    the rule and the count, not 'got 1 in total'). The 8 CPU devices come from XLA_FLAGS, or
    from the train command's ``--cpu_devices=8``."""
    env = {"JAX_PLATFORMS": "cpu"}
    args = ["--cpu_devices=8"] if how == "cpu_devices" else []
    if how == "xla_flags":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    proc, _, workdir = _run("unroll.num_particles=8", tmp_path, env, args)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "each of the 8 devices must hold whole pairs (8 particles is 1 per device)" in line, line
    assert "use a multiple of 16" in line and not workdir.exists()


def test_cpu_devices_must_be_positive(tmp_path):
    proc, _, workdir = _run("seed=0", tmp_path, args=["--cpu_devices=0"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cpu_devices" in lines[0], proc.stderr[-2000:]
    assert not workdir.exists()
