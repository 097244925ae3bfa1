"""The installed package is the product (issue 25): the wheel built from this checkout, installed
where the checkout is not importable, runs its commands from an empty directory.

The wheel is built offline from a copy of the sources (``pip wheel --no-build-isolation``, with
the test environment's setuptools) and installed with ``pip install --no-deps --target SITE``
on top of the test environment's dependencies. The commands run as the entry-point scripts pip
writes into ``SITE/bin`` (what ``lopt-train`` etc. are), with ``PYTHONPATH=SITE`` and an
empty temporary working directory; every module they import must come from SITE.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest
from tests import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lopt", "tasks", "estimators")
SOURCES = ("pyproject.toml", "README.md", "configs", *PACKAGES)
# Compilation dominates the runs: the tests' fast compile flags, as the other command tests use.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)


def _pip(*args: str, cwd: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> str:
    """The wheel of this checkout, installed into a directory of its own."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    root = tmp_path_factory.mktemp("package")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy(path, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), "./src",
         cwd=str(root))
    (wheel,) = glob.glob(str(root / "dist" / "lopt-*.whl"))
    _pip("install", "--no-deps", "-q", "--target", str(root / "site"), wheel, cwd=str(root))
    return str(root / "site")


def _files(top: str, pattern: str) -> set[str]:
    return {os.path.relpath(p, top) for p in glob.glob(os.path.join(top, pattern), recursive=True)
            if "__pycache__" not in p}


def _run(site: str, command: str, *args: str, cwd, timeout: int = 300):
    """``SITE/bin/COMMAND ARGS`` in ``cwd`` with only SITE added to the path."""
    env = dict(ENV, PYTHONPATH=site)
    return subprocess.run([os.path.join(site, "bin", command), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_every_module_and_the_configs_inside_lopt(site):
    """Every module of the checkout and every config, the configs as lopt/configs: no
    top-level ``configs`` in site-packages."""
    for package in PACKAGES:
        assert _files(ROOT, f"{package}/**/*.py") <= _files(site, f"{package}/**/*.py"), package
    configs = {os.path.basename(p) for p in _files(ROOT, "configs/*.py")}
    assert configs and configs == {os.path.basename(p) for p in _files(site, "lopt/configs/*.py")}
    for kernel_file in ("*.cc", "*.h"):  # the CPU kernels' sources and the headers they include
        assert _files(ROOT, f"lopt/kernels/{kernel_file}") <= _files(site, f"lopt/kernels/{kernel_file}")
    top = {name for name in os.listdir(site) if not name.endswith(".dist-info")}
    assert top == {*PACKAGES, "bin"}, top
    for command in ("lopt-train", "lopt-eval", "lopt-export", "lopt-ablate", "lopt-reproduce",
                    "lopt-import"):
        assert os.access(os.path.join(site, "bin", command), os.X_OK), command


PROBE = """
import os, sys
import lopt.cli.train, lopt.training, lopt.experiments.elo, lopt.experiments.quickstart
from lopt.experiments import inputs
site = os.environ["PYTHONPATH"]
ours = [m for name, m in sys.modules.items() if name.split(".")[0] in ("lopt", "tasks", "estimators")]
outside = [m.__name__ for m in ours if getattr(m, "__file__", None) and not m.__file__.startswith(site)]
assert not outside, outside
assert inputs.CHECKOUT is None and inputs.CONFIGS == os.path.join(site, "lopt", "configs")
for name in inputs.shipped():
    inputs.load_config(name)  # siblings (naive -> elo, ...) load by path, installed too
print(lopt.__file__)
"""


def test_installed_modules_and_configs_come_from_the_install(site, tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(ENV, PYTHONPATH=site))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == os.path.join(site, "lopt", "__init__.py")


@pytest.mark.parametrize("command, args, needle", [
    ("lopt-train", ["--config=quickstrat"], "config error: --config: no shipped config named "
                                            "'quickstrat' (shipped: ablate_estimators, "),
    # The configs load (the override's key is checked against them), nothing trains.
    ("lopt-ablate", ["--set=unroll.particlez=4"], "error: --set unroll.particlez: the config has "
                                                 "no key unroll.particlez"),
    ("lopt-reproduce", ["--experiment=nope"], "error: --experiment must be one of"),
])
def test_installed_commands_fail_in_one_line(site, tmp_path, command, args, needle):
    proc = _run(site, command, *args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert proc.stderr.startswith(needle) and proc.stderr.count("\n") == 1, proc.stderr[-4000:]
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_installed_train_and_reproduce_run_from_an_empty_directory(site, tmp_path):
    """The issue's two commands, as a new user runs them after ``pip install .``: everything
    they write goes under the working directory, nothing into the install."""
    before = _files(site, "**/*")
    proc = _run(site, "lopt-train", "--config=quickstart", "--config.num_outer_steps=3",
                "--noprogress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "runs" / "quickstart" / "export" / "optimizer.safetensors").is_file()

    proc = _run(site, "lopt-reproduce", "--experiment=quickstart", "--budget=smoke",
                "--noprogress", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = tmp_path / "runs" / "reproduce" / "smoke" / "results" / "quickstart.md"
    assert "**Outcome.**" in report.read_text()
    assert _files(site, "**/*") == before


ISSUE_CONFIG = """
import my_tasks  # registers rosenbrock2d: the user's module, imported by the user's config
from ml_collections import ConfigDict

from lopt.experiments.inputs import load_config


def get_config():
    c = load_config("quickstart")
    c.task = ConfigDict(dict(name="rosenbrock2d"))
    c.lopt.hidden_size, c.lopt.hidden_layers = 4, 1
    c.unroll.num_particles, c.unroll.trunc_length = 2, 4
    c.unroll.horizon.length = 8
    c.num_outer_steps = 2
    return c
"""


@pytest.mark.slow
def test_installed_commands_train_and_evaluate_a_task_of_the_user_s_own(site, tmp_path):
    """Issue 29 as reported, installed: a task registered in the user's module (the
    docs/examples task), imported by the user's config file; lopt-train meta-trains on it and
    exports, then lopt-eval of the export finds the task with no flag (the run recorded it)."""
    shutil.copy(os.path.join(ROOT, "docs", "examples", "rosenbrock.py"), tmp_path / "my_tasks.py")
    (tmp_path / "my_config.py").write_text(ISSUE_CONFIG)
    proc = _run(site, "lopt-train", "--config=my_config.py", "--workdir=run", "--noprogress",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    proc = _run(site, "lopt-eval", "--export=run/export/optimizer.safetensors",
                "--task=rosenbrock2d", "--steps=8", "--seeds=2", "--lrs=0.01,0.1", "--out=eval",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "adam (lr=" in proc.stdout and (tmp_path / "eval" / "results.json").is_file()
