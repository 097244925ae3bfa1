"""Tests for lopt.export: the single-file learned-optimizer export format."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt
from lopt import export
from lopt.base import config_of


@pytest.fixture(scope="module")
def tiny():
    learned_opt = lopt.get("mlp", hidden_size=8, hidden_layers=1)
    meta_params = learned_opt.init(jax.random.PRNGKey(3))
    return learned_opt, meta_params


@pytest.fixture
def saved(tmp_path, tiny):
    learned_opt, meta_params = tiny
    path = tmp_path / "nested" / "dir" / "opt.lopt"
    export.save(path, learned_opt, meta_params, metadata={"outer_step": 7, "note": "tiny"})
    return path


def _split(path):
    """(header dict, header bytes, payload bytes) of an export file."""
    data = path.read_bytes()
    off = len(export.MAGIC)
    (n,) = struct.unpack("<Q", data[off : off + 8])
    header_bytes = data[off + 8 : off + 8 + n]
    return json.loads(header_bytes), header_bytes, data[off + 8 + n :]


def _write(path, header, payload):
    header_bytes = json.dumps(header).encode("utf-8")
    path.write_bytes(export.MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + payload)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(saved, tiny):
    learned_opt, meta_params = tiny
    loaded_opt, loaded_params = export.load(saved)
    assert loaded_opt == learned_opt
    assert loaded_opt.name == "mlp"
    _assert_trees_equal(loaded_params, meta_params)
    # Loading with the matching architecture given returns that object and the same arrays.
    given = lopt.get("mlp", hidden_size=8, hidden_layers=1)
    opt2, params2 = export.load(saved, learned_opt=given)
    assert opt2 is given
    _assert_trees_equal(params2, meta_params)


def test_round_trip_preserves_special_values(tmp_path, tiny):
    learned_opt, meta_params = tiny
    weird = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), meta_params)
    weird["mlp"][0]["b"] = weird["mlp"][0]["b"].at[-1].set(-0.0)
    path = export.save(tmp_path / "weird.lopt", learned_opt, weird)
    _, loaded = export.load(path)
    for x, y in zip(jax.tree.leaves(weird), jax.tree.leaves(loaded)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_metadata_and_header(saved, tiny):
    learned_opt, _ = tiny
    header = export.read_metadata(saved)
    assert header["format_version"] == export.FORMAT_VERSION
    assert header["metadata"] == {"outer_step": 7, "note": "tiny"}
    assert header["architecture"] == {
        "name": "mlp",
        "config": json.loads(json.dumps(config_of(learned_opt))),
    }
    leaves = {tuple(leaf["path"]): leaf for leaf in header["meta_params"]["leaves"]}
    assert leaves[("mlp", "0", "w")]["shape"] == [learned_opt.num_features, 8]
    expected = {"path": ["mlp", "1", "b"], "shape": [2], "dtype": "float32"}
    assert leaves[("mlp", "1", "b")] == expected
    assert header["created"].endswith("+00:00")
    assert header["payload_bytes"] == len(_split(saved)[2])


def test_save_returns_path_and_leaves_no_temp_files(tmp_path, tiny):
    learned_opt, meta_params = tiny
    out = export.save(tmp_path / "a.lopt", learned_opt, meta_params)
    assert out == str(tmp_path / "a.lopt")
    export.save(out, learned_opt, meta_params, metadata={"again": True})  # overwrite in place
    assert os.listdir(tmp_path) == ["a.lopt"]
    assert export.read_metadata(out)["metadata"] == {"again": True}


def test_metadata_must_be_json(tmp_path, tiny):
    learned_opt, meta_params = tiny
    with pytest.raises(export.ExportError, match="JSON"):
        export.save(tmp_path / "x.lopt", learned_opt, meta_params, metadata={"f": object()})
    assert not (tmp_path / "x.lopt").exists()


def test_save_rejects_meta_params_of_another_architecture(tmp_path, tiny):
    learned_opt, _ = tiny
    other = lopt.get("mlp", hidden_size=16, hidden_layers=1).init(jax.random.PRNGKey(0))
    with pytest.raises(export.ArchitectureMismatchError, match="mlp/0/"):
        export.save(tmp_path / "x.lopt", learned_opt, other)
    assert not (tmp_path / "x.lopt").exists()


def test_load_optimizer_matches_original(saved, tiny):
    learned_opt, meta_params = tiny
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7.0, "b": jnp.array([0.5, -1.0])}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
    ref = learned_opt.optimizer(meta_params)
    opt = export.load_optimizer(saved)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    ref_state, state = ref.init(params), opt.init(params)
    for _ in range(2):
        ref_up, ref_state = ref.update(grads, ref_state, params, loss=jnp.float32(1.0))
        up, state = opt.update(grads, state, params, loss=jnp.float32(1.0))
        _assert_trees_equal(up, ref_up)
        params = optax.apply_updates(params, up)


def test_flipped_payload_byte_is_corrupt(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(export.CorruptExportError, match="corrupted") as err:
        export.load(saved)
    assert str(saved) in str(err.value)


@pytest.mark.parametrize("keep", [4, 14, 40, -1])
def test_truncated_file_is_corrupt(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:-10])
    with pytest.raises(export.CorruptExportError, match="truncated") as err:
        export.load(saved)
    assert str(saved) in str(err.value)


def test_trailing_bytes_are_corrupt(saved):
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(export.CorruptExportError, match="follow the payload"):
        export.load(saved)


def test_wrong_magic_is_corrupt(saved):
    data = saved.read_bytes()
    saved.write_bytes(b"NOT-AN-EXPORT" + data[len(export.MAGIC) :])
    with pytest.raises(export.CorruptExportError, match="magic") as err:
        export.load(saved)
    assert str(saved) in str(err.value)
    with pytest.raises(export.CorruptExportError):
        export.read_metadata(saved)


def test_unparsable_header_is_corrupt(saved):
    _, header_bytes, payload = _split(saved)
    garbage = b"{" + b"x" * (len(header_bytes) - 1)
    saved.write_bytes(export.MAGIC + struct.pack("<Q", len(garbage)) + garbage + payload)
    with pytest.raises(export.CorruptExportError, match="header"):
        export.load(saved)


def test_loading_as_another_config_is_a_mismatch(saved):
    with pytest.raises(export.ArchitectureMismatchError) as err:
        export.load(saved, learned_opt=lopt.get("mlp", hidden_size=16, hidden_layers=1))
    msg = str(err.value)
    assert "export" in msg and "'mlp'" in msg
    assert '"hidden_size": 8' in msg and '"hidden_size": 16' in msg
    assert "options differ: hidden_size (8 in the export, 16 requested)" in msg


@dataclasses.dataclass(frozen=True)
class _OtherLOpt:
    """A stand-in for another architecture (need not be registered to be compared)."""

    hidden_size: int = 8
    name: ClassVar[str] = "adafac_mlp"


def test_loading_as_another_architecture_is_a_mismatch(saved):
    with pytest.raises(export.ArchitectureMismatchError, match="'mlp'.*but 'adafac_mlp'"):
        export.load(saved, learned_opt=_OtherLOpt())


def test_tampered_header_shape_is_an_architecture_mismatch(saved):
    # Only the payload is checksummed; a hand-edited leaf shape in the header is caught by the
    # comparison with the architecture's own init and reported as an ArchitectureMismatchError.
    header, _, payload = _split(saved)
    header["meta_params"]["leaves"][0]["shape"] = [3, 3]
    _write(saved, header, payload)
    with pytest.raises(export.ArchitectureMismatchError, match=r"\[3, 3\] in the export") as err:
        export.load(saved)
    assert str(saved) in str(err.value)


def test_tampered_header_config_is_an_architecture_mismatch(saved):
    # Header claims hidden_size=16 while the (valid) payload holds hidden_size=8 arrays.
    header, _, payload = _split(saved)
    header["architecture"]["config"]["hidden_size"] = 16
    _write(saved, header, payload)
    with pytest.raises(export.ArchitectureMismatchError, match="mlp/0/"):
        export.load(saved)


def test_future_format_version_is_unsupported(saved):
    header, _, payload = _split(saved)
    header["format_version"] = export.FORMAT_VERSION + 1
    _write(saved, header, payload)
    with pytest.raises(export.UnsupportedFormatError, match="format_version"):
        export.load(saved)
    with pytest.raises(export.UnsupportedFormatError):
        export.read_metadata(saved)


def test_unknown_architecture_name(saved):
    header, _, payload = _split(saved)
    header["architecture"]["name"] = "no_such_lopt"
    _write(saved, header, payload)
    with pytest.raises(export.ExportError, match="no_such_lopt"):
        export.load(saved)


def test_error_hierarchy():
    for cls in (
        export.CorruptExportError,
        export.ArchitectureMismatchError,
        export.UnsupportedFormatError,
    ):
        assert issubclass(cls, export.ExportError)
    assert issubclass(export.ExportError, ValueError)
