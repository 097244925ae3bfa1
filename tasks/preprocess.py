"""Image preprocessing applied once when a dataset is loaded (``tasks.data.load``).

Pure numpy functions on host arrays: resizing, grey/colour conversion, pixel scaling, class
subsets and per-class index tables. Running them in numpy costs no XLA compilation (eager
``jax.image.resize`` compiles for seconds on a busy CPU) and works the same while a jit traces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCALES = ("unit", "centered", "standardize")
_RESIZE_CHUNK = 4096  # images resized per einsum, to bound the temporary memory
# ITU-R BT.601 luma weights: the usual RGB -> grey conversion (as in PIL's "L" mode).
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def normalize_size(
    resize: int | Sequence[int] | None, what: str = "resize"
) -> tuple[int, int] | None:
    """``None``, ``n`` or ``(h, w)`` -> ``None`` or ``(h, w)``; raises ValueError otherwise."""
    if resize is None:
        return None
    if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
        size = (int(resize), int(resize))
    elif (
        isinstance(resize, Sequence)
        and len(resize) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in resize)
    ):
        size = (int(resize[0]), int(resize[1]))
    else:
        raise ValueError(f"{what} must be None, an int or a pair (height, width), got {resize!r}")
    if min(size) < 1:
        raise ValueError(f"{what} must be positive, got {resize!r}")
    return size


def _linear_weights(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` bilinear resampling weights, antialiased when shrinking.

    The triangle kernel is widened by ``size_in / size_out`` when shrinking, and each output
    pixel's weights sum to one: the weights of ``jax.image.resize(..., "linear",
    antialias=True)`` (``jax.image.scale_and_translate``), computed in numpy.
    """
    inv_scale = size_in / size_out
    kernel_scale = max(inv_scale, 1.0)
    sample = (np.arange(size_out) + 0.5) * inv_scale - 0.5
    dist = np.abs(sample[:, None] - np.arange(size_in)[None, :]) / kernel_scale
    weights = np.maximum(0.0, 1.0 - dist)
    total = weights.sum(axis=1, keepdims=True)
    ok = total > 1000 * np.finfo(np.float32).eps
    weights = np.where(ok, weights / np.where(total, total, 1), 0)
    inside = (sample >= -0.5) & (sample <= size_in - 0.5)
    return np.where(inside[:, None], weights, 0.0).astype(np.float32)


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[n, H, W, C]`` float images to ``size`` (antialiased when shrinking;
    equal to ``jax.image.resize(images, ..., "linear")`` up to float rounding)."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    if (h, w) == tuple(size):
        return images
    wh, ww = _linear_weights(h, size[0]), _linear_weights(w, size[1])
    out = np.empty((n, size[0], size[1], c), np.float32)
    for i in range(0, n, _RESIZE_CHUNK):
        out[i : i + _RESIZE_CHUNK] = np.einsum(
            "oh,nhwc,pw->nopc", wh, images[i : i + _RESIZE_CHUNK], ww, optimize=True
        )
    return out


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grey (1 channel) <-> colour (3 channels): replicate grey, or take RGB luma."""
    images = np.asarray(images)
    have = images.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (colour), got {channels!r}")
    if have == channels:
        return images
    if have not in (1, 3):
        raise ValueError(f"cannot convert images with {have} channels to {channels}")
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    return images @ _LUMA[:, None]


def scale_images(splits: dict[str, dict], mode: str) -> dict[str, dict]:
    """Rescale ``[0, 1]`` pixels: ``unit`` keeps them, ``centered`` maps to ``[-1, 1]``,
    ``standardize`` subtracts the train split's per-channel mean and divides by its std."""
    if mode not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {mode!r}")
    if mode == "unit":
        return splits
    if mode == "centered":
        return {s: {**a, "image": 2.0 * np.asarray(a["image"]) - 1.0} for s, a in splits.items()}
    train = np.asarray(splits["train"]["image"], np.float64)
    mean = train.mean(axis=(0, 1, 2))
    std = np.maximum(train.std(axis=(0, 1, 2)), 1e-6)
    return {
        s: {**a, "image": ((np.asarray(a["image"]) - mean) / std).astype(np.float32)}
        for s, a in splits.items()
    }


def select_classes(
    splits: dict[str, dict], classes: Sequence[int], num_classes: int, name: str
) -> dict[str, dict]:
    """Keep the examples of ``classes`` and relabel class ``classes[i]`` as ``i``."""
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"dataset {name!r}: classes must be distinct class ids, got {classes}")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(
            f"dataset {name!r} has classes 0..{num_classes - 1}; classes {bad} do not exist"
        )
    lookup = np.full(num_classes, -1, np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    out = {}
    for split, arrays in splits.items():
        new = lookup[np.asarray(arrays["label"])]
        keep = np.flatnonzero(new >= 0)
        if not len(keep):
            raise ValueError(
                f"dataset {name!r}: split {split!r} has no examples of classes {classes}"
            )
        image = np.asarray(arrays["image"])[keep]
        out[split] = {"image": image, "label": new[keep].astype(np.int32)}
    return out


def class_index(labels: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class example indices for drawing class-balanced batches inside jit.

    Returns ``{"by_class": int32 [num_classes, m], "count": int32 [num_classes]}`` where row
    ``c`` lists the ``count[c]`` examples of class ``c`` (then repeats them up to ``m``, the
    largest class size, so every entry of a non-empty row is an example of that class).
    """
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    count = np.bincount(labels, minlength=num_classes)[:num_classes]
    width = max(1, int(count.max()) if len(count) else 1)
    by_class = np.zeros((num_classes, width), np.int32)
    start = 0
    for c in range(num_classes):
        idx = order[start : start + count[c]]
        start += count[c]
        if len(idx):
            by_class[c] = np.resize(idx, width)
    return {"by_class": by_class, "count": count.astype(np.int32)}
