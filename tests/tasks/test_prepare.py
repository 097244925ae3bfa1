"""scripts/prepare_data.py and tasks.prepare: raw files as their publishers distribute them
(built here in tiny fake form: IDX files, CIFAR-10 pickles, downsampled-ImageNet npz, a text
file) become the prepared datasets the paper task families default to; every bad raw file
fails with a one-line error naming it, before anything is written."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import tasks
from tasks import data, errors, idx
from tasks import prepare as prepare_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "prepare_data.py")
_IDX_CODES = {"uint8": 0x08, "int8": 0x09}


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, _IDX_CODES[array.dtype.name], array.ndim])
    return header + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


def _fake_mnist(directory, splits=(("train", 12), ("t10k", 6)), size=28, label_offset=0):
    """IDX files whose pixel [0, 0] is a running example id; returns {prefix: (images, labels)}."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    out, start = {}, 0
    for prefix, n in splits:
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        images[:, 0, 0] = np.arange(start, start + n)
        labels = ((np.arange(n) + start) % 10 + label_offset).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with open(os.path.join(directory, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(gzip.compress(_idx_bytes(array)))
        out[prefix] = (images, labels)
        start += n
    return out


def _chw_rows(images_hwc: np.ndarray) -> np.ndarray:
    """[n, 32, 32, 3] -> the [n, 3072] channel-major rows CIFAR-10 and ImageNet32 store."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)


def _fake_cifar(directory, per_batch=5, labels=None, **overrides):
    """cifar-10-batches-py with 6 x ``per_batch`` images (30 by default); returns the images."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6 * per_batch, 32, 32, 3), dtype=np.uint8)
    all_labels = np.arange(6 * per_batch) % 10 if labels is None else np.asarray(labels)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        part = slice(i * per_batch, (i + 1) * per_batch)
        batch = {
            b"batch_label": f"batch {i + 1} of 6".encode(),
            b"labels": [int(x) for x in all_labels[part]],
            b"data": _chw_rows(images[part]),
            b"filenames": [f"img_{j}.png".encode() for j in range(per_batch)],
        }
        batch.update(overrides.get(name, {}))
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return images, all_labels


def _fake_imagenet32(directory, counts=(6, 4), n_val=5, val_labels=None):
    """train_data_batch_*.npz (in a subdirectory, as the zip unpacks) and val_data.npz."""
    rng = np.random.default_rng(2)
    train_dir = os.path.join(directory, "Imagenet32_train_npz")
    os.makedirs(train_dir, exist_ok=True)
    out = []
    for i, n in enumerate(counts, start=1):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        labels[0] = 1000 if i == 1 else 1  # both ends of the 1-based range
        np.savez(
            os.path.join(train_dir, f"train_data_batch_{i}.npz"),
            data=_chw_rows(images), labels=labels, mean=np.zeros(3072),
        )  # fmt: skip
        out.append((images, labels))
    images = rng.integers(0, 256, (n_val, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(1, 1001, n_val) if val_labels is None else np.asarray(val_labels)
    np.savez(os.path.join(directory, "val_data.npz"), data=_chw_rows(images), labels=labels)
    return out, (images, labels)


TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 30


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0]


# ----------------------------------------------------------------------------------------------
# Each format, prepared and loaded by its catalogue name.


def test_mnist(tmp_path):
    raw = _fake_mnist(tmp_path / "raw")
    dd = str(tmp_path / "tfds")
    prepared = prepare_lib.prepare("mnist", str(tmp_path / "raw"), dd, progress=False)
    assert prepared.path == os.path.join(dd, "mnist", "1.0.0")
    assert prepared.splits == {"train": 12, "test": 6} and prepared.num_classes == 10
    arrays = data.read_arrays("mnist", dd)
    np.testing.assert_array_equal(arrays["test"]["image"], raw["t10k"][0])
    np.testing.assert_array_equal(arrays["train"]["label"], raw["train"][1])
    ds = data.load("mnist", dd, valid_fraction=0.25)
    assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (9, 3, 6)
    # The paper families that default to MNIST now build on it.
    family = tasks.get("conv_mnist", data_dir=dd)
    assert family.dataset == "mnist" and family.image_shape == (28, 28, 1)
    assert family.param_count() == 160 + 12832 + 15690  # conv_mnist at 28x28, as in the paper


def test_mnist_test_split_alone_matches_the_idx_source(tmp_path):
    """The t10k files alone (as in ../shared/data): the same 72/8/20 split as 'idx:DIR'."""
    _fake_mnist(tmp_path / "raw", splits=(("t10k", 50),))
    dd = str(tmp_path / "tfds")
    prepared = prepare_lib.prepare("mnist", str(tmp_path / "raw"), dd, progress=False)
    assert prepared.splits == {"test": 50}
    assert any("36 train / 4 valid / 10 test" in note for note in prepared.notes)
    a = data.load("mnist", dd)
    b = data.load(f"idx:{tmp_path / 'raw'}", str(tmp_path / "other"))
    for split in ("train", "valid", "test"):
        assert a.size(split) == b.size(split) == {"train": 36, "valid": 4, "test": 10}[split]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(a.splits[split][key]), b.splits[split][key])


def test_cifar10(tmp_path):
    images, labels = _fake_cifar(tmp_path / "cifar-10-batches-py")
    dd = str(tmp_path / "tfds")
    # The directory above cifar-10-batches-py is accepted too.
    prepared = prepare_lib.prepare("cifar10", str(tmp_path), dd, progress=False)
    assert prepared.splits == {"train": 25, "test": 5} and prepared.num_classes == 10
    arrays = data.read_arrays("cifar10", dd)
    np.testing.assert_array_equal(arrays["train"]["image"], images[:25])  # HWC, in file order
    np.testing.assert_array_equal(arrays["test"]["image"], images[25:])
    np.testing.assert_array_equal(arrays["test"]["label"], labels[25:])
    family = tasks.get("conv_cifar", data_dir=dd, batch_size=4)
    assert family.dataset == "cifar10" and family.num_classes == 10
    assert family.image_shape == (32, 32, 3) and family.data.size("test") == 5
    np.testing.assert_allclose(
        np.asarray(family.arrays["test"]["image"]), images[25:] / 255.0, atol=1e-6
    )


def test_imagenet_resized_32x32(tmp_path):
    train, (val_images, val_labels) = _fake_imagenet32(tmp_path / "raw")
    dd = str(tmp_path / "tfds")
    prepared = prepare_lib.prepare(
        "imagenet_resized/32x32", str(tmp_path / "raw"), dd, progress=False
    )
    assert prepared.path == os.path.join(dd, "imagenet_resized", "32x32", "1.0.0")
    assert prepared.splits == {"train": 10, "validation": 5} and prepared.num_classes == 1000
    arrays = data.read_arrays("imagenet_resized/32x32", dd)
    np.testing.assert_array_equal(arrays["train"]["image"], np.concatenate([i for i, _ in train]))
    np.testing.assert_array_equal(
        arrays["train"]["label"], np.concatenate([lab for _, lab in train]) - 1  # 0-based
    )
    assert arrays["train"]["label"].min() == 0 and arrays["train"]["label"].max() == 999
    np.testing.assert_array_equal(arrays["validation"]["image"], val_images)
    ds = data.load("imagenet_resized/32x32", dd, valid_fraction=0.2)
    assert ds.num_classes == 1000 and ds.image_shape == (32, 32, 3)
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (8, 2, 5)
    family = tasks.get("mlp_d3_w128", data_dir=dd)
    assert family.dataset == "imagenet_resized/32x32" and family.num_classes == 1000


def test_tiny_shakespeare(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    dd = str(tmp_path / "tfds")
    prepared = prepare_lib.prepare("tiny_shakespeare", str(path), dd, progress=False)
    assert prepared.splits == {"train": len(TEXT)} and prepared.num_classes is None
    # Not the published input.txt: said, not fatal.
    assert any("sha256" in note and "differs from the published" in note for note in prepared.notes)
    ds = data.load_text("tiny_shakespeare", dd)
    text = "".join(ds.decode(ds.splits[s]["tokens"]) for s in ("train", "valid", "test"))
    assert text == TEXT and ds.vocab == tuple(sorted(set(TEXT)))
    n = len(TEXT)  # 90/5/5 as tfds' tiny_shakespeare
    assert (ds.size("valid"), ds.size("test")) == (round(0.05 * n), round(0.05 * n))
    family = tasks.get(
        "gpt2_mini", data_dir=dd, num_layers=1, width=8, num_heads=2, context=8, batch_size=2
    )
    assert family.dataset == "tiny_shakespeare" and family.vocab_size == len(set(TEXT))


def test_prepared_copy_is_not_replaced_without_overwrite(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    dd = str(tmp_path / "tfds")
    prepare_lib.prepare("tiny_shakespeare", str(path), dd, progress=False)
    path.write_text("Something else entirely.\n" * 20)
    with pytest.raises(FileExistsError) as info:
        prepare_lib.prepare("tiny_shakespeare", str(path), dd, progress=False)
    target = os.path.join(dd, "tiny_shakespeare", "1.0.0")
    assert _first_line(info.value).startswith(f"{target} already exists")
    assert "--overwrite" in _first_line(info.value)
    prepare_lib.prepare("tiny_shakespeare", str(path), dd, overwrite=True, progress=False)
    data.load.cache_clear()
    ds = data.load_text("tiny_shakespeare", dd)
    assert ds.decode(ds.splits["train"]["tokens"]).startswith("Something else")


# ----------------------------------------------------------------------------------------------
# Bad raw files: a one-line error naming the file; nothing written.


def _fails(dataset, source, tmp_path, error, starts_with, contains=()):
    dd = tmp_path / "tfds"
    with pytest.raises(error) as info:
        prepare_lib.prepare(dataset, str(source), str(dd), progress=False)
    first = _first_line(info.value)
    assert first.startswith(str(starts_with)), first
    for text in contains:
        assert text in first, first
    assert not (dd / dataset.split("/")[0]).exists()  # nothing written
    return first


def test_mnist_label_beyond_ten_classes(tmp_path):
    _fake_mnist(tmp_path / "raw", splits=(("t10k", 12),), label_offset=1)  # labels 1..10
    _fails(
        "mnist", tmp_path / "raw", tmp_path, errors.LabelRangeError,
        tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz",
        ["label 10 at index 9 is out of range (10 classes declared)", "1 of 12 labels"],
    )  # fmt: skip


def test_mnist_wrong_image_size(tmp_path):
    _fake_mnist(tmp_path / "raw", splits=(("t10k", 4),), size=10)
    _fails(
        "mnist", tmp_path / "raw", tmp_path, idx.IdxFormatError,
        tmp_path / "raw" / "t10k-images-idx3-ubyte.gz",
        ["10x10 uint8 images; MNIST images are 28x28"],
    )  # fmt: skip


def test_mnist_cut_short_gzip(tmp_path):
    _fake_mnist(tmp_path / "raw", splits=(("t10k", 4),))
    path = tmp_path / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    _fails(
        "mnist", tmp_path / "raw", tmp_path, idx.IdxFormatError, path, ["truncated or corrupt gzip"]
    )


def test_cifar10_missing_batch(tmp_path):
    _fake_cifar(tmp_path)
    os.remove(tmp_path / "test_batch")
    _fails(
        "cifar10", tmp_path, tmp_path, FileNotFoundError, tmp_path,
        ["missing CIFAR-10 batch file(s) test_batch"],
    )  # fmt: skip


def test_cifar10_label_out_of_range(tmp_path):
    labels = np.arange(30) % 10
    labels[27] = 10
    _fake_cifar(tmp_path, labels=labels)
    _fails(
        "cifar10", tmp_path, tmp_path, errors.LabelRangeError, tmp_path / "test_batch",
        ["label 10 at index 2 is out of range"],
    )  # fmt: skip


def test_cifar10_negative_label(tmp_path):
    labels = np.arange(30) % 10
    labels[1] = -1
    _fake_cifar(tmp_path, labels=labels)
    _fails(
        "cifar10", tmp_path, tmp_path, errors.LabelRangeError, tmp_path / "data_batch_1",
        ["label -1 at index 1"],
    )  # fmt: skip


def test_cifar10_images_and_labels_disagree(tmp_path):
    _fake_cifar(tmp_path, data_batch_3={b"labels": [0, 1, 2]})
    _fails(
        "cifar10", tmp_path, tmp_path, errors.DataFileError, tmp_path / "data_batch_3",
        ["5 images but 3 labels"],
    )  # fmt: skip


def test_cifar10_wrong_image_size(tmp_path):
    _fake_cifar(tmp_path, data_batch_2={b"data": np.zeros((5, 1024), np.uint8)})
    _fails(
        "cifar10", tmp_path, tmp_path, errors.DataFileError, tmp_path / "data_batch_2",
        ["'data' is uint8 (5, 1024)"],
    )  # fmt: skip


def test_cifar10_truncated_pickle(tmp_path):
    _fake_cifar(tmp_path)
    path = tmp_path / "data_batch_4"
    path.write_bytes(path.read_bytes()[:500])
    _fails(
        "cifar10", tmp_path, tmp_path, errors.DataFileError, path,
        ["not a readable CIFAR-10 batch pickle"],
    )  # fmt: skip


def test_cifar10_pickle_with_code_is_refused(tmp_path):
    _fake_cifar(tmp_path, data_batch_5={b"hook": print})
    first = _fails(
        "cifar10", tmp_path, tmp_path, errors.DataFileError, tmp_path / "data_batch_5",
        ["not a readable CIFAR-10 batch pickle"],
    )  # fmt: skip
    assert "refers to __builtin__.print" in first  # protocol 2 spells builtins so


def test_imagenet_labels_are_one_based(tmp_path):
    _fake_imagenet32(tmp_path / "raw", val_labels=[3, 0, 7, 1, 2])
    _fails(
        "imagenet_resized/32x32", tmp_path / "raw", tmp_path, errors.LabelRangeError,
        tmp_path / "raw" / "val_data.npz",
        ["label 0 at index 1 is outside 1..1000 (downsampled-ImageNet labels are 1-based)"],
    )  # fmt: skip


def test_imagenet_64x64_rows(tmp_path):
    _fake_imagenet32(tmp_path / "raw")
    bad = tmp_path / "raw" / "val_data.npz"
    np.savez(bad, data=np.zeros((2, 12288), np.uint8), labels=np.array([1, 2]))
    _fails(
        "imagenet_resized/32x32", tmp_path / "raw", tmp_path, errors.DataFileError, bad,
        ["'data' is uint8 (2, 12288)", "larger download"],
    )  # fmt: skip


def test_imagenet_missing_and_corrupt_npz(tmp_path):
    _fake_imagenet32(tmp_path / "raw")
    val = tmp_path / "raw" / "val_data.npz"
    raw = val.read_bytes()
    val.write_bytes(raw[: len(raw) // 3])
    _fails(
        "imagenet_resized/32x32", tmp_path / "raw", tmp_path, errors.DataFileError, val,
        ["not a readable .npz file"],
    )  # fmt: skip
    os.remove(val)
    _fails(
        "imagenet_resized/32x32", tmp_path / "raw", tmp_path, FileNotFoundError,
        tmp_path / "raw", ["no val_data.npz"],
    )  # fmt: skip


def test_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1") * 10)
    _fails(
        "tiny_shakespeare", path, tmp_path, errors.TextFormatError, path,
        ["not UTF-8 text (byte 3"],
    )  # fmt: skip


def test_unknown_dataset_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*prepares mnist, cifar10"):
        prepare_lib.prepare("svhn", str(tmp_path), str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match=r"--source .*nowhere does not exist; give PATH"):
        prepare_lib.prepare("cifar10", str(tmp_path / "nowhere"), str(tmp_path / "tfds"))
    text = tmp_path / "a.txt"
    text.write_text(TEXT)
    with pytest.raises(NotADirectoryError, match=f"--source {text} is not a directory"):
        prepare_lib.prepare("mnist", str(text), str(tmp_path / "tfds"))
    with pytest.raises(IsADirectoryError, match=f"--source {tmp_path} is a directory"):
        prepare_lib.prepare("tiny_shakespeare", str(tmp_path), str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()


# ----------------------------------------------------------------------------------------------
# The command line.


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_help_exits_zero():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--dataset" in proc.stdout and "--source" in proc.stdout
    assert "imagenet_resized/32x32" in proc.stdout


def test_command_line(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    dd = tmp_path / "tfds"
    args = ["--dataset=tiny_shakespeare", f"--source={path}", f"--data_dir={dd}", "--noprogress"]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {dd / 'tiny_shakespeare' / '1.0.0'} (train {len(TEXT):,} bytes)")
    assert 'use it with dataset="tiny_shakespeare" (the default of gpt2_mini)' in last
    assert f"LOPT_DATA_DIR={dd}" in last
    assert "note: " in proc.stderr and "differs from the published" in proc.stderr
    again = _run(*args)  # already prepared: one line, exit 1
    assert again.returncode == 1
    error_lines = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert error_lines == [f"error: {dd / 'tiny_shakespeare' / '1.0.0'} already exists "
                           "(dataset 'tiny_shakespeare' is prepared); pass --overwrite "
                           "(overwrite=True) to replace it"]  # fmt: skip
    bad = _run("--dataset=cifar10", f"--source={tmp_path}", f"--data_dir={dd}")
    assert bad.returncode == 1 and "error: " in bad.stderr
    assert "missing CIFAR-10 batch file(s) data_batch_1" in bad.stderr
