"""MNIST-format IDX files: the reader, the directory layout, the one-time conversion into
array_record, and every malformed input with its message. The tests write their own files."""

from __future__ import annotations

import gzip
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

import tasks
from tasks import data, errors, idx

_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array)
    header = bytes([0, 0, _CODES[array.dtype.name], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, raw: bytes, gz: bool = False) -> str:
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)
    return str(path)


def write_mnist_like(directory, prefix: str, n: int, *, gz: bool, seed: int = 0, size: int = 10):
    """``prefix``-images-idx3-ubyte / -labels-idx1-ubyte with pixel [0, 0] = example id."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    labels = (np.arange(n) % 10).astype(np.uint8)
    ext = ".gz" if gz else ""
    write(directory / f"{prefix}-images-idx3-ubyte{ext}", idx_bytes(images), gz)
    write(directory / f"{prefix}-labels-idx1-ubyte{ext}", idx_bytes(labels), gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(_CODES))
def test_read_idx_round_trip(tmp_path, dtype, gz):
    array = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    path = write(tmp_path / "a.idx", idx_bytes(array), gz)
    got = idx.read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_compression_is_detected_from_the_content(tmp_path):
    array = np.arange(5, dtype=np.uint8)
    plain_named_gz = write(tmp_path / "x-labels-idx1-ubyte.gz", idx_bytes(array))
    gz_named_plain = write(tmp_path / "y-labels-idx1-ubyte", idx_bytes(array), gz=True)
    np.testing.assert_array_equal(idx.read_idx(plain_named_gz), array)
    np.testing.assert_array_equal(idx.read_idx(gz_named_plain), array)


_IMAGES = np.zeros((3, 4, 4), np.uint8)
_GOOD = idx_bytes(_IMAGES)


@pytest.mark.parametrize(
    "raw, gz, expected_ndim, error, match",
    [
        (b"", False, None, idx.IdxFormatError, "truncated IDX file: 0 bytes"),
        (b"\x00\x00", False, None, idx.IdxFormatError, "shorter than the 4-byte magic"),
        (b"\x12\x34\x56\x78" + _GOOD[4:], False, None, idx.IdxFormatError, "wrong magic number 0x12345678"),
        (b"\x00\x00\x07\x03" + _GOOD[4:], False, None, idx.IdxFormatError, "wrong magic number 0x00000703"),
        (b"\x00\x00\x08\x00", False, None, idx.IdxFormatError, "wrong magic number 0x00000800"),
        (_GOOD[:10], False, None, idx.IdxFormatError, "truncated IDX header"),
        (_GOOD[:-5], False, None, idx.IdxFormatError, r"truncated IDX file: .* \(48 bytes of data\) but only 43"),
        (_GOOD[:-5], True, None, idx.IdxFormatError, "truncated IDX file"),
        (_GOOD + b"\x00\x01", False, None, idx.IdxFormatError, "2 unexpected bytes"),
        (_GOOD, False, 1, idx.IdxFormatError, "declares a 3-D array, but labels files are 1-D"),
        (idx_bytes(np.zeros(3, np.uint8)), False, 3, idx.IdxFormatError, "images and labels files swapped"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, raw, gz, expected_ndim, error, match):
    path = write(tmp_path / "bad-images-idx3-ubyte", raw, gz)
    with pytest.raises(error, match=match) as info:
        idx.read_idx(path, expected_ndim=expected_ndim)
    assert path in str(info.value)


def test_truncated_gzip_stream(tmp_path):
    compressed = gzip.compress(_GOOD)
    path = write(tmp_path / "cut-images-idx3-ubyte.gz", compressed[: len(compressed) // 2])
    with pytest.raises(idx.IdxFormatError, match="truncated or corrupt gzip") as info:
        idx.read_idx(path)
    assert path in str(info.value)


def test_missing_file_and_directory(tmp_path):
    missing = str(tmp_path / "nope-images-idx3-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=f"IDX file {missing} does not exist"):
        idx.read_idx(missing)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        idx.read_idx(str(tmp_path))


def test_find_idx_splits(tmp_path):
    write_mnist_like(tmp_path, "train", 4, gz=True)
    write_mnist_like(tmp_path, "t10k", 3, gz=False)
    write_mnist_like(tmp_path, "t10k", 3, gz=True)  # plain and gzipped: the plain one wins
    (tmp_path / "README").write_text("not an IDX file")
    splits = idx.find_idx_splits(str(tmp_path))
    assert set(splits) == {"train", "test"}
    assert splits["train"] == (
        str(tmp_path / "train-images-idx3-ubyte.gz"),
        str(tmp_path / "train-labels-idx1-ubyte.gz"),
    )
    assert splits["test"][0] == str(tmp_path / "t10k-images-idx3-ubyte")


def test_find_idx_splits_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="IDX directory .*missing does not exist"):
        idx.find_idx_splits(str(tmp_path / "missing"))
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        idx.find_idx_splits(str(file))
    with pytest.raises(FileNotFoundError, match="no IDX files in .*train-images-idx3-ubyte.gz"):
        idx.find_idx_splits(str(tmp_path))
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(_IMAGES), gz=True)
    with pytest.raises(FileNotFoundError) as info:
        idx.find_idx_splits(str(tmp_path))
    assert "train-images-idx3-ubyte.gz has no matching labels file" in str(info.value)
    assert str(tmp_path / "train-labels-idx1-ubyte") in str(info.value)
    os.remove(tmp_path / "train-images-idx3-ubyte.gz")
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(FileNotFoundError, match="has no matching images file"):
        idx.find_idx_splits(str(tmp_path))


def test_image_and_label_counts_must_match(tmp_path):
    images = write(tmp_path / "train-images-idx3-ubyte", idx_bytes(_IMAGES))
    labels = write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(idx.IdxFormatError, match="holds 3 images but .* holds 4 labels") as info:
        idx.read_idx_split(images, labels)
    assert images in str(info.value) and labels in str(info.value)


def test_load_idx_directory_is_converted_once(tmp_path, monkeypatch):
    raw_dir, data_dir = tmp_path / "mnist", str(tmp_path / "tfds")
    raw_dir.mkdir()
    train_images, train_labels = write_mnist_like(raw_dir, "train", 50, gz=True)
    test_images, test_labels = write_mnist_like(raw_dir, "t10k", 20, gz=False, seed=1)
    name = f"idx:{raw_dir}"
    ds = data.load(name, data_dir)
    assert ds.name == name and ds.num_classes == 10 and ds.image_shape == (10, 10, 1)
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (45, 5, 20)
    test = np.asarray(ds.splits["test"]["image"])[..., 0]
    np.testing.assert_allclose(test, test_images / 255.0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(ds.splits["test"]["label"]), test_labels)
    ids = np.concatenate(
        [np.round(np.asarray(ds.splits[s]["image"])[:, 0, 0, 0] * 255) for s in ("train", "valid")]
    )
    assert sorted(ids.astype(int)) == list(range(50))
    [converted] = [d for d in os.listdir(data_dir) if not d.startswith(".")]
    assert converted.startswith("idx_mnist_")
    # Later reads take the array_record copy; the IDX files are not parsed again.
    data.load.cache_clear()
    monkeypatch.setattr(idx, "read_idx", lambda *a, **k: pytest.fail("parsed IDX again"))
    again = data.load(name, data_dir)
    np.testing.assert_array_equal(np.asarray(again.splits["test"]["image"]), test[..., None])
    assert len([d for d in os.listdir(data_dir) if not d.startswith(".")]) == 1


def test_test_split_only_is_held_out(tmp_path):
    """As in ../shared/data: only the t10k files. 80% train (10% of it valid), 20% test."""
    write_mnist_like(tmp_path, "t10k", 100, gz=True)
    ds = data.load(f"idx:{tmp_path}", str(tmp_path / "tfds"))
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (72, 8, 20)
    ids = [
        set(np.round(np.asarray(ds.splits[s]["image"])[:, 0, 0, 0] * 255).astype(int).tolist())
        for s in ("train", "valid", "test")
    ]
    assert set.union(*ids) == set(range(100)) and sum(map(len, ids)) == 100
    other_seed = data.load(f"idx:{tmp_path}", str(tmp_path / "tfds"), seed=5)
    np.testing.assert_array_equal(
        np.asarray(other_seed.splits["test"]["image"]), np.asarray(ds.splits["test"]["image"])
    )


def test_bad_idx_file_fails_loading_with_its_name(tmp_path):
    write_mnist_like(tmp_path, "train", 10, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(idx.IdxFormatError, match="truncated IDX file") as info:
        data.load(f"idx:{tmp_path}", str(tmp_path / "tfds"))
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.get("mlp_orig", dataset=f"idx:{tmp_path / 'nowhere'}", data_dir=str(tmp_path))
    assert not (tmp_path / "tfds").exists()  # nothing converted


def test_task_on_local_idx_files(tmp_path):
    write_mnist_like(tmp_path, "t10k", 60, gz=True)
    family = tasks.get(
        "conv_mnist", dataset=f"idx:{tmp_path}", data_dir=str(tmp_path / "tfds"), batch_size=5
    )
    assert family.image_shape == (10, 10, 1) and family.num_classes == 10
    spec = family.sample(jax.random.PRNGKey(0))
    batch = family.batch(spec, jax.random.PRNGKey(1), "test")
    assert batch["image"].shape == (5, 10, 10, 1)
    assert family.param_count((28, 28, 1), 10) == 160 + 12832 + 15690


def test_negative_labels(tmp_path):
    images = write(tmp_path / "train-images-idx3-ubyte", idx_bytes(_IMAGES))
    labels = write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.array([1, -2, 0], np.int8)))
    with pytest.raises(errors.LabelRangeError) as info:
        data.load(f"idx:{tmp_path}", str(tmp_path / "tfds"))
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{labels}: negative label -2 at index 1 (1 of 3 labels")
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "tfds").exists()  # nothing converted
    del images


_LABELS = np.zeros(3, np.uint8)


@pytest.mark.parametrize(
    "images, labels, bad, match",
    [
        (_IMAGES.astype(np.int32), _LABELS, "images", r"images of type int32 \(IDX type 0x0c\)"),
        (_IMAGES.astype(np.int8), _LABELS, "images", r"images of type int8 \(IDX type 0x09\)"),
        (_IMAGES, np.zeros(3, np.float32), "labels", "labels of type float32; label files hold"),
    ],
)
def test_wrong_data_types(tmp_path, images, labels, bad, match):
    paths = {
        "images": write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(images)),
        "labels": write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(labels)),
    }
    with pytest.raises(idx.IdxFormatError, match=match) as info:
        data.load(f"idx:{tmp_path}", str(tmp_path / "tfds"))
    assert str(info.value).startswith(f"{paths[bad]}: ")


def test_float_images_are_accepted(tmp_path):
    images = np.linspace(0, 1, 20 * 16, dtype=np.float32).reshape(20, 4, 4)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(images))
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes((np.arange(20) % 2).astype(np.uint8)))
    ds = data.load(f"idx:{tmp_path}", str(tmp_path / "tfds"))
    got = np.concatenate([np.asarray(ds.splits[s]["image"]).ravel() for s in ds.splits])
    np.testing.assert_allclose(np.sort(got), np.sort(images.ravel()))


def _same_size_same_mtime_rewrite(path, new_bytes: bytes) -> None:
    """Replace a file's content keeping its size and mtime (as `cp -p` or a restore can)."""
    st = os.stat(path)
    assert len(new_bytes) == st.st_size
    with open(path, "wb") as f:
        f.write(new_bytes)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_changed_file_is_reconverted_not_served_stale(tmp_path):
    """The converted copy records each file's sha256: a file changed after conversion, even
    with the same size and mtime, is noticed, said, and converted again."""
    write_mnist_like(tmp_path, "t10k", 30, gz=False)
    name, data_dir = f"idx:{tmp_path}", str(tmp_path / "tfds")
    before = data.load(name, data_dir)
    labels_path = tmp_path / "t10k-labels-idx1-ubyte"
    new_labels = (9 - np.arange(30) % 10).astype(np.uint8)
    _same_size_same_mtime_rewrite(labels_path, idx_bytes(new_labels))
    with pytest.warns(errors.StaleDataWarning) as record:
        after = data.load(name, data_dir)
    message = str(record[0].message)
    assert message.startswith(f"{labels_path} changed since it was converted into {data_dir}")
    assert "sha256" in message and message.endswith("; reconverting it")
    assert after is not before
    labels = np.concatenate([np.asarray(after.splits[s]["label"]) for s in after.splits])
    old = np.concatenate([np.asarray(before.splits[s]["label"]) for s in before.splits])
    np.testing.assert_array_equal(labels, 9 - old)
    # One converted copy (rebuilt in place), and a later load is quiet and serves the new data.
    assert len([d for d in os.listdir(data_dir) if not d.startswith(".")]) == 1
    data.load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = data.load(name, data_dir)
    np.testing.assert_array_equal(
        np.asarray(again.splits["test"]["label"]), np.asarray(after.splits["test"]["label"])
    )


def test_touched_file_is_not_reconverted(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, "t10k", 20, gz=True)
    name, data_dir = f"idx:{tmp_path}", str(tmp_path / "tfds")
    data.load(name, data_dir)
    os.utime(tmp_path / "t10k-images-idx3-ubyte.gz", ns=(1, 10**18))  # new mtime, same bytes
    data.load.cache_clear()
    monkeypatch.setattr(idx, "read_idx", lambda *a, **k: pytest.fail("parsed IDX again"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.load(name, data_dir).size("test") == 4


def test_stale_copy_that_cannot_be_rebuilt(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, "t10k", 20, gz=False)
    name, data_dir = f"idx:{tmp_path}", str(tmp_path / "tfds")
    data.load(name, data_dir)
    images_path = tmp_path / "t10k-images-idx3-ubyte"
    raw = bytearray(images_path.read_bytes())
    raw[-1] ^= 0xFF
    _same_size_same_mtime_rewrite(images_path, bytes(raw))

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with pytest.warns(errors.StaleDataWarning), pytest.raises(errors.StaleDataError) as info:
        data.load(name, data_dir)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{images_path} changed since it was converted")
    assert "cannot be removed" in first and "PermissionError" in first
