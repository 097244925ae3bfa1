"""lopt.torch is optional: importing lopt never imports torch, and without torch
``import lopt.torch`` says how to install it. Runs whether or not torch is installed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_importing_lopt_does_not_import_torch():
    code = (
        "import sys, lopt, lopt.export, lopt.mlp, lopt.adafac\n"
        "assert 'torch' not in sys.modules, 'lopt imported torch'\n"
        "assert 'lopt.torch' not in sys.modules\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    monkeypatch.delitem(sys.modules, "lopt.torch", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'lopt\[torch\]'"):
        importlib.import_module("lopt.torch")
