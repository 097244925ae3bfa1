"""Device-resident image-classification datasets: :func:`load` and what it caches.

``load`` reads a prepared dataset (``digits``, written on first use from scikit-learn's 8x8
digits; ``idx:DIR``, converted by ``tasks.data.local``; or a catalogue name) into float32
images and int32 labels on the device, in the train/valid/test splits task families sample
from inside jit, and caches the result. Preprocessed variants (``tasks.preprocess``) and the
class index for class-balanced sampling are cached per dataset too, so a family built twice
does not read or resize anything twice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np

from tasks import preprocess
from tasks.base import SPLITS
from tasks.data.local import _local_idx, _prepared
from tasks.data.locate import GENERATED_TEXT, IDX_PREFIX, TEXT_PREFIX, _resolve
from tasks.data.store import _open, _read_source, write_arrays
from tasks.errors import DataFileError, LabelRangeError

DIGITS_DATASET = "lopt_digits"  # on-disk name of the embedded default
DIGITS_TEST_FRACTION = 0.2
_DIGITS_SEED = 0  # fixes the on-disk train/test split of lopt_digits for good
_TEST_SEED = 0  # fixes the test split held out of a dataset that has only one split


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Image classification splits held on the device.

    ``splits[split]`` for split in train/valid/test is ``{"image": float32 [n, H, W, C] (in
    [0, 1] unless ``load(scale=...)`` says otherwise), "label": int32 [n]}``. Hashes by
    identity, so it can sit in static task config.
    """

    name: str
    num_classes: int
    splits: dict[str, dict[str, jax.Array]]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"]["image"].shape[1:])

    def size(self, split: str) -> int:
        """Number of examples in ``split``."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {tuple(self.splits)}, got {split!r}")
        return int(self.splits[split]["label"].shape[0])


def load(
    name: str = "digits",
    data_dir: str | None = None,
    *,
    valid_fraction: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    resize: int | Sequence[int] | None = None,
    channels: int | None = None,
    scale: str = "unit",
    classes: Sequence[int] | None = None,
) -> Dataset:
    """The image dataset ``name`` as a device-resident :class:`Dataset` (cached).

    ``"digits"``: scikit-learn's 1797 8x8 digits (pixel values 0..16 scaled to [0, 1], shape
    [n, 8, 8, 1], 10 classes), written on first use into ``data_dir`` as ``lopt_digits`` with a
    fixed 80/20 train/test split (seed 0), then read back like any other dataset.

    ``"idx:DIR"``: the MNIST-format IDX files in ``DIR`` (see ``tasks.idx.find_idx_splits``),
    converted once into array_record in ``data_dir`` and read back from there.

    Any other name: a tfds catalogue dataset (``"mnist"``, ``"imagenet_resized/32x32"``)
    already prepared as array_record in ``data_dir``, with features ``"image"`` and ``"label"``.
    Integer images are divided by their dtype's maximum (uint8: 255); 2-D images get a channel
    axis. Splits: ``train``; ``validation`` (or ``valid``) becomes ``valid``; ``test``, or
    ``validation`` when there is no test split (imagenet_resized). A dataset with one split only
    (such as MNIST's t10k files alone) becomes train, with a ``test_fraction`` of it held out
    (fixed seed 0) as test. If no split serves as ``valid``, a ``valid_fraction`` of train,
    drawn with ``seed``, is held out from it (digits: 359 test, 144 valid, 1294 train examples
    at the default 0.1). ``num_classes`` comes from the label's ``ClassLabel``, else max label
    + 1.

    Preprocessing, in this order: ``resize`` (``n`` or ``(h, w)``; bilinear, antialiased when
    shrinking), ``channels`` (1: grey, 3: colour), ``classes`` (keep these class ids, relabelled
    0..k-1 in the given order), ``scale`` (``"unit"``: [0, 1]; ``"centered"``: [-1, 1];
    ``"standardize"``: zero mean, unit variance per channel on the train split).

    The result is cached on all arguments (with ``data_dir`` resolved, and local files by
    path and content): the same call returns the same object; ``load.cache_clear()`` empties
    the caches of :func:`load` and :func:`load_text`.

    Raises:
      DatasetNotPreparedError: at once, if the dataset is not prepared in ``data_dir``.
      FileNotFoundError, tasks.idx.IdxFormatError: for missing or malformed IDX files.
      tasks.errors.LabelRangeError: labels below 0, or not below the number of classes the
        dataset's ``ClassLabel`` declares.
      tasks.errors.CorruptDatasetError: an unreadable ``dataset_info.json``, a missing
        (``DatasetFileMissingError``) or damaged shard.
    """
    for what, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{what} must be in (0, 1), got {fraction!r}")
    size = preprocess.normalize_size(resize)
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be None, 1 (grey) or 3 (colour), got {channels!r}")
    if scale not in preprocess.SCALES:
        raise ValueError(f"scale must be one of {preprocess.SCALES}, got {scale!r}")
    if classes is not None:
        classes = tuple(int(c) for c in classes)
    data_dir = _resolve(data_dir)
    source, content = _image_source(name, data_dir)
    base = _load(
        name,
        source,
        content,
        data_dir,
        float(valid_fraction),
        int(seed),
        float(test_fraction),
    )
    if size is None and channels is None and scale == "unit" and classes is None:
        return base
    return _preprocessed(base, size, channels, scale, classes)


def _image_source(name: str, data_dir: str) -> tuple[str, str | None]:
    """(the on-disk dataset behind ``name``, a token of its source files' content or None),
    prepared first if it is ours (digits, IDX files).

    Local files are looked at on every call (a directory listing and a few ``stat``s; their
    sha256 only when a size or time changed), and the content token is part of the in-memory
    cache key, so a changed file is never served from the cache either.
    """
    if name == "digits":
        _prepare_digits(data_dir)
        return DIGITS_DATASET, None
    if name.startswith(IDX_PREFIX):
        return _local_idx(name[len(IDX_PREFIX) :], data_dir)
    if name.startswith(TEXT_PREFIX) or name == GENERATED_TEXT:
        raise ValueError(
            f"dataset {name!r} is a text corpus (see tasks.data.load_text); image tasks need an "
            "image dataset: 'digits', 'idx:DIR' or a catalogue name such as 'mnist'"
        )
    return name, None


@functools.lru_cache(maxsize=None)
def _load(
    name: str,
    source: str,
    content: str | None,  # only a cache key: the token of local source files' content
    data_dir: str,
    valid_fraction: float,
    seed: int,
    test_fraction: float,
) -> Dataset:
    sources, features, vdir = _open(source, data_dir)
    missing = {"image", "label"} - set(features.keys())
    if missing:
        raise ValueError(f"dataset {name!r} has no {sorted(missing)} feature(s): {features}")
    raw = {
        split: _read_source(src, features, ("image", "label"), f"{vdir} (split {split!r})")
        for split, src in sources.items()
    }
    declared = getattr(features["label"], "num_classes", None)
    for split, arrays in raw.items():
        check_labels(arrays["label"], declared, f"{vdir} (split {split!r})")

    if "train" not in raw and len(raw) == 1:
        (only,) = raw.values()
        raw = dict(zip(("train", "test"), _hold_out(only, test_fraction, _TEST_SEED, name)))
    if "train" not in raw:
        raise ValueError(f"dataset {name!r} has no 'train' split; it has {sorted(raw)}")
    valid_name = next((s for s in ("validation", "valid") if s in raw), None)
    test_name = "test" if "test" in raw else valid_name
    if test_name is None:
        raise ValueError(f"dataset {name!r} has neither a 'test' nor a 'validation' split")
    splits = {"train": raw["train"], "test": raw[test_name]}
    if valid_name is not None and valid_name != test_name:
        splits["valid"] = raw[valid_name]
    else:
        splits["train"], splits["valid"] = _hold_out(raw["train"], valid_fraction, seed, name)

    num_classes = declared or 1 + max(int(s["label"].max()) for s in splits.values())
    return Dataset(
        name=name,
        num_classes=int(num_classes),
        splits={s: _to_device(splits[s], name) for s in SPLITS},
    )


@functools.lru_cache(maxsize=None)
def _preprocessed(
    base: Dataset,
    size: tuple[int, int] | None,
    channels: int | None,
    scale: str,
    classes: tuple[int, ...] | None,
) -> Dataset:
    """``base`` resized, colour-converted, class-selected and scaled (in numpy, then put back
    on the device)."""
    splits = {s: {k: np.asarray(v) for k, v in a.items()} for s, a in base.splits.items()}
    for arrays in splits.values():
        if size is not None:
            arrays["image"] = preprocess.resize_images(arrays["image"], size)
        if channels is not None:
            arrays["image"] = preprocess.convert_channels(arrays["image"], channels)
    num_classes = base.num_classes
    if classes is not None:
        splits = preprocess.select_classes(splits, classes, num_classes, base.name)
        num_classes = len(classes)
    splits = preprocess.scale_images(splits, scale)
    with jax.ensure_compile_time_eval():
        device = {
            s: {
                "image": jax.device_put(np.asarray(a["image"], np.float32)),
                "label": jax.device_put(np.asarray(a["label"], np.int32)),
            }
            for s, a in splits.items()
        }
    return Dataset(name=base.name, num_classes=num_classes, splits=device)


@functools.lru_cache(maxsize=None)
def class_index(dataset: Dataset) -> dict[str, dict[str, jax.Array]]:
    """``{split: {"by_class", "count"}}`` device arrays for class-balanced sampling of
    ``dataset`` (see ``tasks.preprocess.class_index``); cached per dataset object."""
    out = {}
    for split, arrays in dataset.splits.items():
        index = preprocess.class_index(np.asarray(arrays["label"]), dataset.num_classes)
        with jax.ensure_compile_time_eval():
            out[split] = {k: jax.device_put(v) for k, v in index.items()}
    return out


def check_labels(labels: np.ndarray, num_classes: int | None, where: str) -> None:
    """Raise unless ``labels`` are integers in ``[0, num_classes)`` (``[0, inf)`` if None).

    ``where`` names the file or dataset directory the labels came from; it starts the message.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataFileError(f"{where}: labels of type {labels.dtype}; class labels are integers")
    if not labels.size:
        return
    bad = labels < 0
    if num_classes is not None:
        bad |= labels >= num_classes
    if bad.any():
        first = int(np.argmax(bad))
        allowed = f"0..{num_classes - 1}" if num_classes is not None else "0, 1, 2, ..."
        declared = f" ({num_classes} classes declared)" if num_classes is not None else ""
        raise LabelRangeError(
            f"{where}: label {int(labels[first])} at index {first} is out of range{declared}; "
            f"{int(bad.sum())} of {labels.size} labels lie outside {allowed}"
        )


def _hold_out(arrays: dict, fraction: float, seed: int, name: str) -> tuple[dict, dict]:
    n = len(arrays["label"])
    n_valid = max(1, round(fraction * n))
    if n_valid >= n:
        raise ValueError(f"dataset {name!r}: train split of {n} is too small to hold out valid")
    perm = np.random.default_rng(seed).permutation(n)
    valid, train = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    return {k: a[train] for k, a in arrays.items()}, {k: a[valid] for k, a in arrays.items()}


def _to_device(arrays: dict[str, np.ndarray], name: str) -> dict[str, jax.Array]:
    image, label = arrays["image"], arrays["label"]
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4 or label.ndim != 1:
        raise ValueError(
            f"dataset {name!r}: expected images [n, H, W(, C)] and labels [n], got "
            f"{image.shape} and {label.shape}"
        )
    if image.dtype.kind in "iu":
        image = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    # `load` may first run while a jit traces a task's batch(); without this the cached
    # arrays would be that trace's tracers instead of concrete device arrays.
    with jax.ensure_compile_time_eval():
        return {
            "image": jax.device_put(image.astype(np.float32)),
            "label": jax.device_put(label.astype(np.int32)),
        }


def _prepare_digits(data_dir: str) -> None:
    """Write scikit-learn's digits as ``lopt_digits`` (train/test) unless already there."""
    if _prepared(DIGITS_DATASET, data_dir):
        return
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int64)
    perm = np.random.default_rng(_DIGITS_SEED).permutation(len(labels))
    n_test = round(DIGITS_TEST_FRACTION * len(labels))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    write_arrays(
        DIGITS_DATASET,
        {
            "train": {"image": images[train], "label": labels[train]},
            "test": {"image": images[test], "label": labels[test]},
        },
        data_dir,
        description="scikit-learn's load_digits: 8x8 images scaled to [0, 1]; fixed 80/20 split.",
        num_classes=10,
    )
