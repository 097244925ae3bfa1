"""Shared fixtures. Every test gets its own dataset cache dir, so the suite never touches
~/.cache and needs no network; datasets are prepared once per session."""

from __future__ import annotations

import os

# Almost every test is compilation: XLA's backend optimisation passes take longer than the
# tiny programs run. Compile without them (a debug option of XLA; identical arithmetic, slower
# code), appended to any XLA_FLAGS of the caller. Subprocess tests pass it on.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

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
