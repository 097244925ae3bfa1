"""The installed commands of pyproject's [project.scripts] (issue 14.5): each is on the PATH of
the environment that runs the tests (``pip install -e .``, as ``make test`` does) and its
``--help`` exits 0 listing its own flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    SCRIPTS = tomllib.load(f)["project"]["scripts"]
# One flag each command defines itself (absl's --help lists only the main module's flags).
OWN_FLAG = {"lopt-train": "--config", "lopt-eval": "--export", "lopt-export": "--workdir",
            "lopt-ablate": "--elo_config", "lopt-reproduce": "--experiment", "lopt-import": "--arch"}


def test_every_command_has_a_flag_to_check():
    assert set(SCRIPTS) == set(OWN_FLAG)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_exits_zero(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not installed here (pip install -e . installs it)")
    proc = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert OWN_FLAG[name] in proc.stdout + proc.stderr
    assert "--module:" in proc.stdout  # every command loads the user's code (docs/extending.md)
    # Exports are safetensors files (lopt.export format 2); no help may still call them .lopt.
    assert not re.search(r"\.lopt\b", proc.stdout + proc.stderr)
