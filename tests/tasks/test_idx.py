"""MNIST-format IDX files: the reader, the directory layout, the one-time conversion into
array_record, and every malformed input with its message. The tests write their own files."""

from __future__ import annotations

import gzip
import os

import jax
import numpy as np
import pytest

import tasks
from tasks import data, idx

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
