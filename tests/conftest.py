"""Shared fixtures. Every test gets its own dataset cache dir, so the suite never touches
~/.cache and needs no network; datasets are prepared once per session."""

from __future__ import annotations

import os

# Almost every test is compilation: compile with XLA's fast debug options (tests/__init__.py
# says which and what they save), appended to any XLA_FLAGS of the caller. Subprocess tests
# pass them on.
from tests import FAST_COMPILE
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

# Many tests compile the same programs again (a fresh MetaTrainer per test, subprocess runs of
# one config): JAX's persistent compilation cache, shared by the xdist workers and the
# subprocesses through the environment, compiles each once. Keyed by the program, the compile
# options and the jax/jaxlib versions, so a stale entry cannot be served; capped at 1 GiB
# (LRU; filelock guards concurrent writers). Only compiles of 0.3 s or more are stored: writing
# every small program costs more than it saves. Measured cold with -n 2, as CI runs it, at -O0
# alone: tests/training + tests/test_outer.py 68 s -> 49 s; tests/estimators +
# tests/test_outer.py 119 s -> 124 s (137 s when every compile is stored). With FAST_COMPILE's
# second flag most compiles fell under 1 s, and the whole suite took 517 s storing those of
# 1 s or more, 487 s storing those of 0.3 s or more (one cold run each, a quiet 2-core VM).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(_ROOT, ".pytest_cache", "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))
# The mlp's fused CPU kernel (lopt/mlp_cpu.py) is built once into the same cache directory.
os.environ.setdefault("LOPT_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "lopt-kernels"))

import pytest  # noqa: E402



@pytest.fixture(scope="session", autouse=True)
def _session_data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds_data"))
    old = os.environ.get("LOPT_DATA_DIR")
    os.environ["LOPT_DATA_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("LOPT_DATA_DIR", None)
    else:
        os.environ["LOPT_DATA_DIR"] = old
