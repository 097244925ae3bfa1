"""Image preprocessing in tasks.data.load: resizing, grey/colour, scaling, class subsets."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tasks import data, preprocess


def test_resize_matches_jax_image_resize():
    x = np.random.default_rng(0).random((2, 28, 20, 3)).astype(np.float32)
    for size in [(14, 14), (32, 32), (28, 9)]:
        want = jax.image.resize(x, (2, *size, 3), "linear", antialias=True)
        np.testing.assert_allclose(preprocess.resize_images(x, size), want, atol=2e-6)
    assert preprocess.resize_images(x, (28, 20)) is not None


def test_constant_images_stay_constant():
    x = np.full((1, 8, 8, 1), 0.25, np.float32)
    for size in [(8, 8), (14, 14), (16, 16), (28, 28), (32, 32), (3, 5)]:
        np.testing.assert_allclose(preprocess.resize_images(x, size), 0.25, atol=1e-6)


def test_channels():
    grey = np.random.default_rng(0).random((2, 3, 3, 1)).astype(np.float32)
    colour = preprocess.convert_channels(grey, 3)
    assert colour.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(preprocess.convert_channels(colour, 1), grey, atol=1e-6)
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
        preprocess.convert_channels(grey, 2)
    with pytest.raises(ValueError, match="4 channels"):
        preprocess.convert_channels(np.zeros((1, 2, 2, 4)), 3)


def test_class_index():
    labels = np.array([2, 0, 2, 1, 2, 0])
    index = preprocess.class_index(labels, 4)
    np.testing.assert_array_equal(index["count"], [2, 1, 3, 0])
    for c in range(3):
        row = index["by_class"][c]
        assert (labels[row] == c).all() and set(row) == set(np.flatnonzero(labels == c))


def test_load_with_preprocessing():
    base = data.load("digits")
    ds = data.load("digits", resize=16, channels=3)
    assert ds.image_shape == (16, 16, 3) and ds.num_classes == 10
    assert data.load("digits", resize=(16, 16), channels=3) is ds  # cached
    assert ds.size("train") == base.size("train")
    np.testing.assert_array_equal(ds.splits["test"]["label"], base.splits["test"]["label"])
    # Down again to 8x8 grey: close to the original (bilinear blurs a little).
    back = preprocess.resize_images(np.asarray(ds.splits["test"]["image"])[..., :1], (8, 8))
    original = np.asarray(base.splits["test"]["image"])
    assert np.corrcoef(back.ravel(), original.ravel())[0, 1] > 0.9

    std = data.load("digits", scale="standardize")
    train = np.asarray(std.splits["train"]["image"])
    assert abs(train.mean()) < 1e-4 and abs(train.std() - 1) < 1e-3
    centered = data.load("digits", scale="centered")
    np.testing.assert_allclose(
        centered.splits["valid"]["image"], 2 * np.asarray(base.splits["valid"]["image"]) - 1
    )

    subset = data.load("digits", classes=(7, 2))
    assert subset.num_classes == 2
    for split in ("train", "valid", "test"):
        want = np.asarray(base.splits[split]["label"])
        got = np.asarray(subset.splits[split]["label"])
        assert (np.bincount(got) == [np.sum(want == 7), np.sum(want == 2)]).all()
        np.testing.assert_array_equal(
            subset.splits[split]["image"], np.asarray(base.splits[split]["image"])[np.isin(want, (7, 2))]
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(resize=0), "positive"),
        (dict(resize=(8, 8, 1)), "pair"),
        (dict(resize=True), "resize"),
        (dict(channels=2), "channels"),
        (dict(scale="zscore"), "scale"),
        (dict(classes=(1, 10)), r"classes \[10\] do not exist"),
        (dict(classes=(1, 1)), "distinct"),
        (dict(test_fraction=1.0), "test_fraction"),
    ],
)
def test_bad_preprocessing_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load("digits", **kwargs)
