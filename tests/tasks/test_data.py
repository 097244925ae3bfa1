"""Tests for tasks/data/: array_record datasets through tensorflow-datasets, no TensorFlow."""

import json
import os
import sys
import threading
import time

import numpy as np
import pytest

from tasks import data


def _arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 4, 3, 2)).astype(np.float32),
        "pixels": rng.integers(0, 256, (n, 5, 5), dtype=np.uint8),
        "label": rng.integers(0, 10, n).astype(np.int32),
        "big": rng.integers(-(2**62), 2**62, (n, 2), dtype=np.int64),
        "exact": rng.normal(size=(n,)),  # float64: tfds' default encoding would round it
        "mask": rng.integers(0, 2, (n, 3)).astype(bool),
    }


def _assert_same(got, want):
    assert set(got) == set(want)
    for split in want:
        assert set(got[split]) == set(want[split])
        for key, a in want[split].items():
            b = got[split][key]
            assert b.dtype == a.dtype and b.shape == a.shape, (split, key, b.dtype, b.shape)
            np.testing.assert_array_equal(b, a)


def test_default_data_dir(monkeypatch, tmp_path):
    """LOPT_DATA_DIR wins over tfds' TFDS_DATA_DIR, which wins over ~/.cache/lopt/..."""
    monkeypatch.setenv("LOPT_DATA_DIR", str(tmp_path / "lopt"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    assert data.default_data_dir() == str(tmp_path / "lopt")
    monkeypatch.delenv("LOPT_DATA_DIR")
    assert data.default_data_dir() == str(tmp_path / "tfds")
    monkeypatch.setenv("LOPT_DATA_DIR", "")  # empty counts as unset
    assert data.default_data_dir() == str(tmp_path / "tfds")
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data.default_data_dir() == os.path.expanduser("~/.cache/lopt/tensorflow_datasets")


def test_tfds_data_dir_is_read(monkeypatch, tmp_path):
    data.write_arrays("in_tfds_dir", {"train": {"x": np.arange(3)}}, str(tmp_path))
    monkeypatch.delenv("LOPT_DATA_DIR")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    np.testing.assert_array_equal(data.read_arrays("in_tfds_dir")["train"]["x"], np.arange(3))


def test_write_read_round_trip_is_exact(tmp_path):
    splits = {"train": _arrays(37, 0), "test": _arrays(11, 1)}
    path = data.write_arrays("round_trip", splits, str(tmp_path), description="test")
    assert path == os.path.join(str(tmp_path), "round_trip", "1.0.0")
    assert any(".array_record" in f for f in os.listdir(path))
    _assert_same(data.read_arrays("round_trip", str(tmp_path)), splits)
    assert "tensorflow" not in sys.modules


def test_second_write_is_a_no_op(tmp_path):
    first = {"train": {"x": np.arange(6, dtype=np.int32).reshape(3, 2)}}
    path = data.write_arrays("no_op", first, str(tmp_path))
    mtimes = {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)}
    other = {"train": {"x": np.zeros((5, 2), np.int32)}}
    assert data.write_arrays("no_op", other, str(tmp_path)) == path
    assert {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)} == mtimes
    _assert_same(data.read_arrays("no_op", str(tmp_path)), first)


def test_concurrent_writers_write_once(tmp_path):
    splits = {"train": _arrays(300)}
    errors = []

    def write():
        try:
            data.write_arrays("concurrent", splits, str(tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert os.listdir(tmp_path / "concurrent") == ["1.0.0"]
    _assert_same(data.read_arrays("concurrent", str(tmp_path)), splits)


def test_class_label_and_versions(tmp_path):
    labels = np.array([0, 3, 2, 1], np.int32)
    data.write_arrays("labelled", {"train": {"label": labels}}, str(tmp_path), num_classes=4)
    data.write_arrays(
        "labelled", {"train": {"label": labels[:2]}}, str(tmp_path), version="1.1.0", num_classes=4
    )
    newest = data.read_arrays("labelled", str(tmp_path))["train"]["label"]
    assert newest.dtype == np.int64  # ClassLabel reads back as int64
    np.testing.assert_array_equal(newest, labels[:2])
    old = data.read_arrays("labelled", str(tmp_path), version="1.0.0")["train"]["label"]
    np.testing.assert_array_equal(old, labels)
    pinned = data.read_arrays("labelled:1.0.0", str(tmp_path))["train"]["label"]
    np.testing.assert_array_equal(pinned, labels)


def test_builder_config_layout(tmp_path):
    """``NAME/CONFIG`` is written where tfds keeps configs, and loads under that name."""
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    splits = {
        "train": {"image": images[:4], "label": np.array([0, 1, 2, 0])},
        "validation": {"image": images[4:], "label": np.array([1, 2])},
    }
    path = data.write_arrays("resized_like/2x2", splits, str(tmp_path), num_classes=3)
    assert path == os.path.join(str(tmp_path), "resized_like", "2x2", "1.0.0")
    _assert_same(data.read_arrays("resized_like/2x2", str(tmp_path)), splits)
    ds = data.load("resized_like/2x2", str(tmp_path), valid_fraction=0.25)
    assert ds.num_classes == 3 and ds.image_shape == (2, 2, 3) and ds.size("test") == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="Bad-Name", splits={"train": {"x": np.zeros(3)}}), "dataset name"),
        (dict(name="mnist/Bad Config", splits={"train": {"x": np.zeros(3)}}), "dataset name"),
        (dict(name="a/b/c", splits={"train": {"x": np.zeros(3)}}), "dataset name"),
        (dict(name="ok", splits={}), "non-empty"),
        (dict(name="ok", splits={"train": {}}), "non-empty"),
        (dict(name="ok", splits={"train": {"x": np.zeros(3), "y": np.zeros(4)}}), "unequal"),
        (dict(name="ok", splits={"train": {"x": np.zeros((0, 2))}}), "empty"),
        (dict(name="ok", splits={"train": {"x": np.float32(1)}}), "leading example axis"),
        (dict(name="ok", splits={"train": {"x": np.array(["a", "b"])}}), "bool/int/float"),
        (dict(name="ok", splits={"bad split": {"x": np.zeros(3)}}), "split names"),
        (dict(name="ok", splits={"train": {"bad-key": np.zeros(3)}}), "feature name"),
        (
            dict(name="ok", splits={"train": {"x": np.zeros((3, 2))}, "test": {"x": np.zeros(3)}}),
            "differ from the other splits",
        ),
        (dict(name="ok", splits={"train": {"x": np.zeros(3)}}, version="1.0"), "version"),
        (dict(name="ok", splits={"train": {"x": np.zeros(3)}}, num_classes=3), "'label'"),
        (dict(name="ok", splits={"train": {"label": np.zeros(3)}}, num_classes=3), "integer"),
        (dict(name="ok", splits={"train": {"label": np.arange(3)}}, num_classes=2), "outside"),
        (dict(name="ok", splits={"train": {"label": np.arange(3)}}, num_classes=0), "num_classes"),
    ],
)
def test_write_arrays_rejects_bad_inputs(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.write_arrays(data_dir=str(tmp_path), **kwargs)
    assert not (tmp_path / "ok").exists()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits_data"))


def _rows(split):
    image = np.asarray(split["image"]).reshape(len(split["label"]), -1)
    label = np.asarray(split["label"])[:, None].astype(np.float32)
    return [r.tobytes() for r in np.concatenate([image, label], axis=1)]


def test_load_digits(digits_dir):
    from sklearn.datasets import load_digits

    ds = data.load("digits", digits_dir)
    assert ds.name == "digits" and ds.num_classes == 10 and ds.image_shape == (8, 8, 1)
    assert set(ds.splits) == {"train", "valid", "test"}
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (1294, 144, 359)
    for split in ds.splits.values():
        image, label = split["image"], split["label"]
        assert image.dtype == np.float32 and label.dtype == np.int32
        assert image.shape[1:] == (8, 8, 1) and label.shape == image.shape[:1]
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert set(np.unique(np.asarray(label))) <= set(range(10))
    # Disjoint and covering: the splits' rows are exactly sklearn's rows (all 1797 are distinct).
    rows = {name: _rows(split) for name, split in ds.splits.items()}
    everything = [r for rs in rows.values() for r in rs]
    raw = load_digits()
    want = _rows({"image": (raw.images / 16.0).astype(np.float32), "label": raw.target})
    assert len(set(want)) == 1797
    assert len(everything) == len(set(everything)) == 1797
    assert set(everything) == set(want)


def test_load_is_cached_and_reads_back_from_disk(digits_dir):
    ds = data.load("digits", digits_dir)
    assert data.load("digits", digits_dir) is ds
    assert data.load("digits", digits_dir, valid_fraction=0.2) is not ds
    data.load.cache_clear()
    again = data.load("digits", digits_dir)
    assert again is not ds
    for split in ds.splits:
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.asarray(again.splits[split][key]), np.asarray(ds.splits[split][key])
            )


def test_valid_fraction_and_seed_only_move_train_and_valid(digits_dir):
    a = data.load("digits", digits_dir, seed=0)
    b = data.load("digits", digits_dir, seed=1, valid_fraction=0.25)
    np.testing.assert_array_equal(
        np.asarray(a.splits["test"]["image"]), np.asarray(b.splits["test"]["image"])
    )
    assert b.size("valid") == round(0.25 * 1438) and b.size("train") + b.size("valid") == 1438
    assert set(_rows(a.splits["train"]) + _rows(a.splits["valid"])) == set(
        _rows(b.splits["train"]) + _rows(b.splits["valid"])
    )
    with pytest.raises(ValueError, match="valid_fraction"):
        data.load("digits", digits_dir, valid_fraction=1.0)


def test_unprepared_catalogue_dataset_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.load("mnist", str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "mnist" in message and str(tmp_path) in message and "tfds build" in message
    assert isinstance(info.value, FileNotFoundError)
    first = message.splitlines()[0]  # stands alone: what, where, and the command that fixes it
    assert first.startswith(f"dataset 'mnist' is not prepared in data dir {tmp_path}")
    assert (
        "python scripts/prepare_data.py --dataset=mnist --source=PATH/TO/mnist "
        f"--data_dir={tmp_path}" in first
    )
    assert info.value.command in first and info.value.dataset == "mnist"
    assert "cvdf-datasets/mnist" in message  # where the raw files come from
    with pytest.raises(data.DatasetNotPreparedError, match="imagenet_resized/32x32"):
        data.read_arrays("imagenet_resized/32x32", str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing downloaded


def test_tfrecord_only_dataset_says_how_to_convert(tmp_path):
    version_dir = tmp_path / "mnist" / "3.0.1"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text("{}")
    (version_dir / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"")
    start = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.load("mnist", str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "TFRecord" in message and "tfds convert_format" in message
    assert f"--dataset_version_dir={version_dir}" in message
    assert "--out_file_format=array_record" in message


def test_catalogue_style_dataset_without_validation_split(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(70)  # an id per example
    labels = np.arange(70) % 7
    splits = {
        "train": {"image": images[:50], "label": labels[:50]},
        "test": {"image": images[50:], "label": labels[50:]},
    }
    data.write_arrays("fake_catalogue", splits, str(tmp_path), version="2.0.0")
    ds = data.load("fake_catalogue", str(tmp_path), valid_fraction=0.2, seed=3)
    assert ds.num_classes == 7  # max label + 1: no ClassLabel
    assert ds.image_shape == (28, 28, 1)
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (40, 10, 20)
    ids = {
        s: np.round(np.asarray(split["image"][:, 0, 0, 0]) * 255).astype(int)
        for s, split in ds.splits.items()
    }
    assert sorted(np.concatenate([ids["train"], ids["valid"]])) == list(range(50))
    np.testing.assert_array_equal(ids["test"], np.arange(50, 70))
    for s, split in ds.splits.items():
        assert split["image"].dtype == np.float32 and split["label"].dtype == np.int32
        want = images[ids[s]] / 255.0
        np.testing.assert_allclose(np.asarray(split["image"])[..., 0], want, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(split["label"]), labels[ids[s]])


def test_validation_split_is_used_as_valid_or_test(tmp_path):
    def split(n, offset):
        return {"image": np.full((n, 2, 2, 3), offset, np.uint8), "label": np.arange(n) % 3}

    three = {"train": split(9, 1), "validation": split(4, 2), "test": split(5, 3)}
    data.write_arrays("with_validation", three, str(tmp_path))
    ds = data.load("with_validation", str(tmp_path))
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (9, 4, 5)
    assert float(ds.splits["valid"]["image"].max()) == pytest.approx(2 / 255)
    # imagenet_resized-style: train and validation only -> validation is the test split.
    two = {"train": split(10, 1), "validation": split(4, 2)}
    data.write_arrays("no_test", two, str(tmp_path), num_classes=5)
    ds = data.load("no_test", str(tmp_path), valid_fraction=0.1)
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (9, 1, 4)
    assert ds.num_classes == 5


def test_real_catalogue_layout_with_encoded_images(tmp_path):
    """A dataset as `tfds build mnist --file_format=array_record` leaves it: PNG Image feature."""
    PIL_Image = pytest.importorskip("PIL.Image")
    import tensorflow_datasets as tfds

    class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "mnist"
        VERSION = tfds.core.Version("3.0.1")
        code_path = None

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            features = tfds.features.FeaturesDict(features)
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(30), "test": self._generate_examples(10)}

        def _generate_examples(self, n):
            for i in range(n):
                image = PIL_Image.fromarray(np.full((28, 28), 8 * i, np.uint8))
                yield i, {"image": image, "label": i % 10}

    Mnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_dir=str(tmp_path / "downloads")
    )
    ds = data.load("mnist", str(tmp_path))
    assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
    assert (ds.size("train"), ds.size("valid"), ds.size("test")) == (27, 3, 10)
    pixel = np.round(np.asarray(ds.splits["train"]["image"][:, 0, 0, 0]) * 255).astype(int)
    np.testing.assert_array_equal(np.asarray(ds.splits["train"]["label"]), (pixel // 8) % 10)
    assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------------------------
# Damaged prepared directories: each fails with a one-line error naming the file.


def _prepared_copy(tmp_path, name="damaged", num_classes=5):
    labels = np.array([0, 1, 2, 3, 4, 0])
    splits = {
        "train": {"image": np.zeros((6, 2, 2), np.uint8), "label": labels},
        "test": {"image": np.ones((2, 2, 2), np.uint8), "label": labels[:2]},
    }
    return data.write_arrays(name, splits, str(tmp_path), num_classes=num_classes)


def _first_line(error) -> str:
    lines = str(error).splitlines()
    assert lines and len(lines[0]) > 40, lines
    return lines[0]


def test_missing_shard(tmp_path):
    vdir = _prepared_copy(tmp_path)
    shard = os.path.join(vdir, "damaged-test.array_record-00000-of-00001")
    os.remove(shard)
    with pytest.raises(data.DatasetFileMissingError) as info:
        data.load("damaged", str(tmp_path))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    first = _first_line(info.value)
    assert first.startswith(f"{shard}: missing shard 1 of 1 of split 'test'")
    assert "dataset_info.json" in first and "prepare it again" in first


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{ not json", "unreadable dataset_info.json .JSONDecodeError"),
        (b"\xff\xfe\x00", "unreadable dataset_info.json .UnicodeDecodeError"),
        (b"[]", "not a tfds dataset info"),
        (b'{"name": "damaged"}', "not a tfds dataset info"),
    ],
)
def test_unreadable_dataset_info(tmp_path, content, match):
    vdir = _prepared_copy(tmp_path)
    info_path = os.path.join(vdir, "dataset_info.json")
    with open(info_path, "wb") as f:
        f.write(content)
    with pytest.raises(data.CorruptDatasetError, match=match) as info:
        data.load("damaged", str(tmp_path))
    assert _first_line(info.value).startswith(f"{info_path}: ")


def test_dataset_info_json_missing_beside_shards(tmp_path):
    vdir = _prepared_copy(tmp_path)
    os.remove(os.path.join(vdir, "dataset_info.json"))
    start = time.monotonic()
    with pytest.raises(data.DatasetFileMissingError) as info:
        data.load("damaged", str(tmp_path))
    assert time.monotonic() - start < 1.0
    first = _first_line(info.value)
    assert first.startswith(f"{os.path.join(vdir, 'dataset_info.json')}: missing")


def test_damaged_features_json(tmp_path):
    vdir = _prepared_copy(tmp_path)
    with open(os.path.join(vdir, "features.json"), "w") as f:
        f.write('{"featuresDict": 3}')
    with pytest.raises(data.CorruptDatasetError) as info:
        data.load("damaged", str(tmp_path))
    assert _first_line(info.value).startswith(f"{vdir}: tfds cannot read the dataset's metadata")


def test_truncated_shard(tmp_path):
    vdir = _prepared_copy(tmp_path)
    shard = os.path.join(vdir, "damaged-train.array_record-00000-of-00001")
    with open(shard, "rb") as f:
        raw = f.read()
    with open(shard, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(data.CorruptDatasetError) as info:
        data.load("damaged", str(tmp_path))
    first = _first_line(info.value)
    assert first.startswith(f"{shard}: ") and "shard 1 of 1 of split 'train'" in first


def test_shard_count_disagrees_with_dataset_info(tmp_path):
    vdir = _prepared_copy(tmp_path)
    info_path = os.path.join(vdir, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["splits"][0]["shardLengths"] = ["9"]  # the train shard holds 6
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(data.CorruptDatasetError, match="holds 6 examples but .* records 9"):
        data.load("damaged", str(tmp_path))


def test_labels_beyond_the_declared_classes(tmp_path):
    vdir = _prepared_copy(tmp_path)
    features_path = os.path.join(vdir, "features.json")
    with open(features_path) as f:
        features = json.load(f)
    features["featuresDict"]["features"]["label"]["classLabel"]["numClasses"] = "3"
    with open(features_path, "w") as f:
        json.dump(features, f)
    with pytest.raises(data.LabelRangeError) as info:
        data.load("damaged", str(tmp_path))
    first = _first_line(info.value)
    assert first.startswith(f"{vdir} (split 'train'): label 3 at index 3 is out of range")
    assert "(3 classes declared)" in first and "2 of 6 labels lie outside 0..2" in first


def test_negative_labels_in_a_prepared_dataset(tmp_path):
    splits = {"train": {"image": np.zeros((4, 2, 2), np.uint8), "label": np.array([0, 1, -1, 1])}}
    vdir = data.write_arrays("negative", splits, str(tmp_path))
    with pytest.raises(data.LabelRangeError, match="label -1 at index 2 is out of range") as info:
        data.load("negative", str(tmp_path))
    assert str(info.value).startswith(f"{vdir} (split 'train')")
