"""What the programs read from outside their code (``lopt.experiments.inputs``): a config named
by path or by a shipped config's name from any directory, and the raw MNIST files found from
``$LOPT_MNIST_SOURCE``, each missing one a one-line UsageError saying how to provide it."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from lopt.experiments import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_shipped_config_loads_by_name_from_any_directory(tmp_path, monkeypatch):
    """Configs that build on a sibling (naive on elo, chen2020_dm_cl_il on chen2020_cl) load it
    by their own file's path, so they work wherever the configs are."""
    monkeypatch.chdir(tmp_path)
    names = inputs.shipped()
    assert names == sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
    for name in names:
        assert isinstance(inputs.load_config(name), ConfigDict), name
    assert inputs.load_config("naive").unroll.trunc_length == inputs.load_config("elo").unroll.trunc_length


@pytest.mark.parametrize("value", ["quickstart", "quickstart.py", "configs/quickstart.py"])
def test_a_shipped_config_by_name(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert inputs.config_path(value) == os.path.join(inputs.CONFIGS, "quickstart.py")


def test_a_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.py").write_text("def get_config():\n    return None\n")
    assert inputs.config_path("quickstart.py") == "quickstart.py"
    assert inputs.config_path("quickstart").endswith(os.path.join("configs", "quickstart.py"))


def test_an_unknown_name_lists_the_shipped_ones():
    with pytest.raises(inputs.UsageError) as e:
        inputs.config_path("quickstrat", "--elo_config")
    message = str(e.value)
    assert "\n" not in message and message.startswith("--elo_config: no shipped config named 'quickstrat'")
    assert all(name in message for name in inputs.shipped())


def test_a_missing_file_is_named():
    with pytest.raises(inputs.UsageError, match=r"^--config: no such config file: nowhere/x\.py \("):
        inputs.config_path("nowhere/x.py")


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _fake_mnist(directory) -> None:
    """Tiny gzipped IDX files in MNIST's names (12 train, 6 t10k examples)."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        arrays = {"images-idx3": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  "labels-idx1": (np.arange(n) % 10).astype(np.uint8)}
        for kind, array in arrays.items():
            (directory / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(_idx(array)))


MNIST_CONFIG = ConfigDict(dict(task=dict(name="mlp_relu", dataset="mnist")))


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    """An empty data dir, no $LOPT_MNIST_SOURCE and no checkout beside a shared/data."""
    monkeypatch.setenv("LOPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(inputs.MNIST_SOURCE_ENV, raising=False)
    monkeypatch.setattr(inputs, "CHECKOUT", None)
    return tmp_path


def test_mnist_without_a_source_says_how_to_give_one(no_mnist):
    with pytest.raises(inputs.UsageError) as e:
        inputs.ensure_mnist(MNIST_CONFIG)
    message = str(e.value)
    assert "\n" not in message and "mnist dataset is not prepared" in message
    assert "set LOPT_MNIST_SOURCE=DIR" in message


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_mnist_from_a_bad_source_names_it(kind, no_mnist, monkeypatch):
    source = no_mnist / "mnist_raw"
    if kind == "empty":
        source.mkdir()
    monkeypatch.setenv(inputs.MNIST_SOURCE_ENV, str(source))
    with pytest.raises(inputs.UsageError) as e:
        inputs.ensure_mnist(MNIST_CONFIG)
    message = str(e.value)
    assert "\n" not in message and str(source) in message and "$LOPT_MNIST_SOURCE" in message
    assert ("is not a directory" if kind == "missing" else "no IDX files") in message


def test_mnist_is_prepared_from_the_source(no_mnist, monkeypatch):
    from tasks import data

    _fake_mnist(no_mnist / "mnist_raw")
    monkeypatch.setenv(inputs.MNIST_SOURCE_ENV, str(no_mnist / "mnist_raw"))
    inputs.ensure_mnist(MNIST_CONFIG)
    assert data.load("mnist").num_classes == 10
    inputs.ensure_mnist(MNIST_CONFIG)  # prepared: nothing to do
    inputs.ensure_mnist(ConfigDict(dict(task=dict(name="digits_mlp"))))  # no mnist needed
