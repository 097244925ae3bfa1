"""Tests for lopt.export: the safetensors learned-optimizer export (format 2)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from safetensors import safe_open

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
    path = tmp_path / "nested" / "dir" / "opt.safetensors"
    export.save(path, learned_opt, meta_params, metadata={"outer_step": 7, "note": "tiny"})
    return path


def _split(path):
    """(tensor table, ``__metadata__``, header bytes, data bytes) of a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    return header, meta, data[8 : 8 + n], data[8 + n :]


def _rewrite(path, tensors=None, **meta_changes):
    """Rewrite the export at ``path`` as a well-formed safetensors file with other tensors and/or
    metadata values; the checksum is recomputed when the tensors change (a file as a buggy or
    foreign writer could make it)."""
    with safe_open(str(path), "np") as f:
        meta = dict(f.metadata())
    if tensors is not None:
        meta["tensors_sha256"] = export.tensors_sha256(tensors)
    else:
        tensors = safetensors.numpy.load_file(str(path))
    meta.update(meta_changes)
    safetensors.numpy.save_file(tensors, str(path), metadata=meta)


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
    path = export.save(tmp_path / "weird.safetensors", learned_opt, weird)
    _, loaded = export.load(path)
    for x, y in zip(jax.tree.leaves(weird), jax.tree.leaves(loaded)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_round_trip_of_scalar_and_learnable_decay_leaves(tmp_path):
    # hyper_adam's meta-params are 0-d arrays; adafac_mlp adds decay_logits with learnable decays.
    for learned_opt in (lopt.get("hyper_adam"), lopt.get("adafac_mlp", hidden_size=4,
                                                          learnable_decays=True)):
        meta_params = learned_opt.init(jax.random.PRNGKey(0))
        path = export.save(tmp_path / f"{learned_opt.name}.safetensors", learned_opt, meta_params)
        loaded_opt, loaded = export.load(path)
        assert loaded_opt == learned_opt
        _assert_trees_equal(loaded, meta_params)


def test_metadata_and_header(saved, tiny):
    learned_opt, _ = tiny
    header = export.read_metadata(saved)
    assert header["format_version"] == export.FORMAT_VERSION == 2
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
    assert set(header["library_versions"]) >= {"jax", "flax", "optax", "safetensors", "numpy"}
    assert header["tensors_sha256"] == export.tensors_sha256(
        safetensors.numpy.load_file(str(saved))
    )


def test_file_is_plain_safetensors_with_documented_metadata(saved, tiny):
    """What a non-JAX reader sees: numpy arrays under the meta-param paths and the documented
    string metadata, whose checksum it can verify with docs/export-format.md's recipe."""
    learned_opt, meta_params = tiny
    tensors = safetensors.numpy.load_file(str(saved))
    assert sorted(tensors) == ["mlp/0/b", "mlp/0/w", "mlp/1/b", "mlp/1/w"]
    for i, layer in enumerate(meta_params["mlp"]):
        for k in ("w", "b"):
            assert tensors[f"mlp/{i}/{k}"].dtype == np.float32
            np.testing.assert_array_equal(tensors[f"mlp/{i}/{k}"], np.asarray(layer[k]))
    with safe_open(str(saved), "np") as f:
        meta = f.metadata()
    assert set(meta) == set(export.METADATA_KEYS)
    assert meta["format"] == "lopt.export" and meta["format_version"] == "2"
    assert meta["architecture"] == "mlp"
    assert lopt.get(meta["architecture"], **json.loads(meta["config"])) == learned_opt
    assert json.loads(meta["metadata"]) == {"outer_step": 7, "note": "tiny"}
    assert json.loads(meta["library_versions"])["jax"] == jax.__version__
    h = hashlib.sha256()  # the recipe of docs/export-format.md, written out independently
    for name, a in sorted(tensors.items()):
        line = json.dumps([name, a.dtype.name, list(a.shape)], separators=(",", ":")) + "\n"
        h.update(line.encode())
        h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
    assert meta["tensors_sha256"] == h.hexdigest()


DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "export-format.md")


def test_documented_recipes_read_an_export(saved, tiny):
    """The Python blocks of docs/export-format.md run as written: the checksum recipe
    (section 4, an assert) and the reader without the safetensors library."""
    learned_opt, meta_params = tiny
    text = open(DOC, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    checksum = next(b for b in blocks if "tensors_sha256" in b and "def " not in b)
    exec(checksum, {"path": str(saved)})
    scope: dict = {}
    exec(next(b for b in blocks if "def read_export" in b), scope)
    name, config, arrays = scope["read_export"](str(saved))
    assert lopt.get(name, **config) == learned_opt
    for i, layer in enumerate(meta_params["mlp"]):
        for k in ("w", "b"):
            np.testing.assert_array_equal(arrays[f"mlp/{i}/{k}"], np.asarray(layer[k]))
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(AssertionError, match="trailing"):
        scope["read_export"](str(saved))


def test_any_path_is_accepted(tmp_path, tiny):
    # save() writes whatever path it is given; the content, not the suffix, is the format.
    learned_opt, meta_params = tiny
    path = export.save(tmp_path / "optimizer.lopt", learned_opt, meta_params)
    assert safetensors.numpy.load_file(path).keys() == {"mlp/0/b", "mlp/0/w", "mlp/1/b", "mlp/1/w"}
    _assert_trees_equal(export.load(path)[1], meta_params)


def test_save_returns_path_and_leaves_no_temp_files(tmp_path, tiny):
    learned_opt, meta_params = tiny
    out = export.save(tmp_path / "a.safetensors", learned_opt, meta_params)
    assert out == str(tmp_path / "a.safetensors")
    export.save(out, learned_opt, meta_params, metadata={"again": True})  # overwrite in place
    assert os.listdir(tmp_path) == ["a.safetensors"]
    assert export.read_metadata(out)["metadata"] == {"again": True}


def test_metadata_must_be_json(tmp_path, tiny):
    learned_opt, meta_params = tiny
    with pytest.raises(export.ExportError, match="JSON"):
        export.save(tmp_path / "x.safetensors", learned_opt, meta_params, metadata={"f": object()})
    assert not (tmp_path / "x.safetensors").exists()


def test_save_rejects_meta_params_of_another_architecture(tmp_path, tiny):
    learned_opt, _ = tiny
    other = lopt.get("mlp", hidden_size=16, hidden_layers=1).init(jax.random.PRNGKey(0))
    with pytest.raises(export.ArchitectureMismatchError, match="mlp/0/"):
        export.save(tmp_path / "x.safetensors", learned_opt, other)
    assert not (tmp_path / "x.safetensors").exists()


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
    with pytest.raises(export.CorruptExportError, match="corrupted.*sha256") as err:
        export.load(saved)
    assert str(saved) in str(err.value)


def test_renamed_tensor_fails_the_checksum(saved):
    # Names are digested with the data: a header edit that keeps the file well-formed is caught.
    data = saved.read_bytes()
    assert data.count(b'"mlp/1/b"') == 1
    saved.write_bytes(data.replace(b'"mlp/1/b"', b'"mlp/1/c"'))
    with pytest.raises(export.CorruptExportError, match="sha256"):
        export.load(saved)


@pytest.mark.parametrize("keep", [4, 14, 40, -1])
def test_truncated_file_is_corrupt(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:-10])
    with pytest.raises(export.CorruptExportError, match="truncated") as err:
        export.load(saved)
    assert str(saved) in str(err.value)


def test_not_an_export_is_corrupt(saved, tmp_path):
    data = saved.read_bytes()
    saved.write_bytes(b"NOT-AN-EXPORT" + data[13:])
    with pytest.raises(export.CorruptExportError, match="corrupted") as err:
        export.load(saved)
    assert str(saved) in str(err.value)
    with pytest.raises(export.CorruptExportError):
        export.read_metadata(saved)
    # A well-formed safetensors file that is not an export (no lopt metadata).
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"w": np.ones((2, 2), np.float32)}, str(plain))
    for fn in (export.load, export.read_metadata):
        with pytest.raises(export.CorruptExportError, match="is it a lopt export"):
            fn(plain)


def test_unparsable_header_is_corrupt(saved):
    _, _, header_bytes, data = _split(saved)
    garbage = b"{" + b"x" * (len(header_bytes) - 1)
    saved.write_bytes(struct.pack("<Q", len(garbage)) + garbage + data)
    with pytest.raises(export.CorruptExportError, match="header"):
        export.load(saved)


def _edit_header(path, edit):
    """Rewrite the safetensors header of ``path`` as ``edit(table, metadata)`` makes it (both
    edited in place), keeping the data bytes: a file whose framing may no longer hold."""
    table, meta, _, data = _split(path)
    edit(table, meta)
    header = json.dumps({**table, "__metadata__": meta}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


# Framing the safetensors library rejects (section 1 of docs/export-format.md), each one way.
BAD_FRAMINGS = {
    "trailing bytes": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
    "header length past the end": lambda p: p.write_bytes(
        struct.pack("<Q", len(p.read_bytes())) + p.read_bytes()[8:]),
    "header not UTF-8": lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}"),
    "header not an object": lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"),
    "shape inconsistent with offsets": lambda p: _edit_header(
        p, lambda t, m: t["mlp/1/b"].update(shape=[3])),
    "overlapping offsets": lambda p: _edit_header(
        p, lambda t, m: t["mlp/1/b"].update(data_offsets=t["mlp/0/b"]["data_offsets"])),
    "unknown dtype code": lambda p: _edit_header(p, lambda t, m: t["mlp/1/b"].update(dtype="Q7")),
    "metadata value not a string": lambda p: _edit_header(p, lambda t, m: m.update(created=1)),
}


@pytest.mark.parametrize("framing", BAD_FRAMINGS)
def test_bad_framing_is_one_typed_error(saved, framing):
    """The safetensors library checks the framing; its error reaches the caller as a one-line
    CorruptExportError naming the file, from load and read_metadata alike."""
    BAD_FRAMINGS[framing](saved)
    for fn in (export.load, export.read_metadata):
        with pytest.raises(export.CorruptExportError, match="corrupted or truncated") as err:
            fn(saved)
        msg = str(err.value)
        assert str(saved) in msg and "safetensors" in msg and "\n" not in msg


def test_dtype_numpy_lacks_is_corrupt(saved):
    # F8_E4M3 is valid safetensors (and mlp/1/b's 8 bytes hold 8 of them), but numpy has no
    # such type: loading reports the file corrupt instead of leaking numpy's error.
    _edit_header(saved, lambda t, m: t["mlp/1/b"].update(dtype="F8_E4M3", shape=[8]))
    with pytest.raises(export.CorruptExportError, match="dtype"):
        export.load(saved)
    leaves = export.read_metadata(saved)["meta_params"]["leaves"]  # the header alone reads fine
    assert {"path": ["mlp", "1", "b"], "shape": [8], "dtype": "F8_E4M3"} in leaves


@pytest.mark.parametrize("changes, needle", [
    ({"format_version": "two"}, "format_version"),
    ({"format_version": "1"}, "format_version"),
    ({"config": "{not json"}, "does not parse"),
    ({"config": "[1, 2]"}, "not a JSON object"),
    ({"metadata": "NaN]"}, "does not parse"),
])
def test_bad_metadata_is_corrupt(saved, changes, needle):
    _rewrite(saved, **changes)
    for fn in (export.load, export.read_metadata):
        with pytest.raises(export.CorruptExportError, match=needle):
            fn(saved)


def test_missing_metadata_key_is_corrupt(saved):
    _edit_header(saved, lambda t, m: m.pop("tensors_sha256"))
    with pytest.raises(export.CorruptExportError, match="lacks tensors_sha256"):
        export.read_metadata(saved)


def test_missing_file_is_an_os_error(tmp_path):
    # Callers (lopt-eval) tell a missing file from a bad one by the exception type.
    with pytest.raises(FileNotFoundError):
        export.load(tmp_path / "missing.safetensors")


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


def test_wrong_leaf_shape_is_an_architecture_mismatch(saved):
    # A well-formed export (valid checksum) whose tensor has another shape than the
    # architecture's init is reported naming the leaf and both shapes.
    tensors = safetensors.numpy.load_file(str(saved))
    tensors["mlp/0/w"] = np.zeros((3, 3), np.float32)
    _rewrite(saved, tensors)
    with pytest.raises(export.ArchitectureMismatchError, match=r"\[3, 3\] in the export") as err:
        export.load(saved)
    assert str(saved) in str(err.value) and "mlp/0/w" in str(err.value)
    del tensors["mlp/0/w"]
    _rewrite(saved, tensors)
    with pytest.raises(export.ArchitectureMismatchError, match="missing mlp/0/w"):
        export.load(saved)


def test_tampered_config_is_an_architecture_mismatch(saved):
    # Metadata claims hidden_size=16 while the (valid) tensors hold hidden_size=8 arrays.
    config = export.read_metadata(saved)["architecture"]["config"]
    assert config["hidden_size"] == 8
    config["hidden_size"] = 16
    _rewrite(saved, config=json.dumps(config))
    with pytest.raises(export.ArchitectureMismatchError, match="mlp/0/"):
        export.load(saved)


def test_future_format_version_is_unsupported(saved):
    _rewrite(saved, format_version=str(export.FORMAT_VERSION + 1))
    with pytest.raises(export.UnsupportedFormatError, match="format_version 3"):
        export.load(saved)
    with pytest.raises(export.UnsupportedFormatError):
        export.read_metadata(saved)


def test_unknown_architecture_name(saved):
    _rewrite(saved, architecture="no_such_lopt")
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
