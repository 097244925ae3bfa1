"""Preparing the paper datasets from raw files a user downloaded (``scripts/prepare_data.py``).

:func:`prepare` reads the raw files of one paper dataset (``tasks.catalogue``), checks every
file, and writes the array_record tfds layout of ``tasks.data.write_arrays`` under the
catalogue name, so ``tasks.data.load("mnist")`` (and every family that defaults to it) then
reads it. Nothing is written until every raw file has been read and checked; each bad file
fails with a one-line error that names it (``tasks.errors``).

Raw formats:

* ``mnist``: a directory of MNIST IDX files, gzipped or not (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-*``). With only the ``t10k-*`` files the dataset has
  a ``test`` split alone, and ``tasks.data.load`` holds out 20% of it as test and 10% of the
  rest as valid: the same 7,200/800/2,000 split as ``dataset="idx:DIR"`` on the same files.
* ``cifar10``: the ``cifar-10-batches-py`` directory of the python version of CIFAR-10
  (pickled ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``; ``data`` is uint8
  ``[10000, 3072]``, channel-major 3 x 32 x 32, ``labels`` 0..9).
* ``imagenet_resized/32x32``: the downsampled ImageNet of Chrabaszcz et al. 2017, the npz
  files ``train_data_batch_1..10.npz`` and ``val_data.npz`` (``data`` uint8 ``[n, 3072]``
  channel-major, ``labels`` 1..1000, 1-based); written as tfds' ``imagenet_resized/32x32``
  writes them (HWC images, labels minus one; splits ``train`` and ``validation``).
* ``tiny_shakespeare``: one UTF-8 text file (gzipped or not), written as one ``train`` split
  that ``tasks.data.load_text`` cuts 90/5/5 into train/valid/test, as tfds'
  ``tiny_shakespeare`` does.

Pickles are read with an unpickler that loads numpy arrays and builtins only, never code.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import shutil
from collections.abc import Callable

import numpy as np

from tasks import catalogue
from tasks import idx as idx_lib
from tasks.data.images import check_labels
from tasks.data.local import read_text_file, source_fingerprint, text_chunks, write_source_record
from tasks.data.locate import _version_dir, default_data_dir
from tasks.data.store import _one_line, write_arrays
from tasks.errors import DataFileError, LabelRangeError, TextFormatError

VERSION = "1.0.0"  # of every dataset prepared here (tfds' own builds carry their own versions)
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_NPZ_TRAIN_RE = re.compile(r"^train_data_batch_(\d+)\.npz$")
_IMAGE_VALUES = 3 * 32 * 32


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` wrote: the dataset, its directory, examples per split, notes."""

    name: str
    path: str
    data_dir: str
    splits: dict[str, int]
    num_classes: int | None
    notes: tuple[str, ...] = ()


def prepare(
    dataset: str,
    source: str,
    data_dir: str | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Prepared:
    """Convert the raw files at ``source`` into the prepared ``dataset`` in ``data_dir``.

    Args:
      dataset: a name in ``tasks.catalogue.PAPER_DATASETS``.
      source: the raw files (a directory, or the text file for ``tiny_shakespeare``).
      data_dir: tfds data dir; defaults to ``tasks.data.default_data_dir()``.
      overwrite: replace an existing prepared copy (else it is an error).
      progress: show progress bars (tqdm) while reading and writing.

    Raises:
      ValueError: an unknown ``dataset``; a ``tasks.errors.DataFileError`` for a bad raw file.
      FileNotFoundError: missing raw files. FileExistsError: already prepared.
    """
    entry = catalogue.PAPER_DATASETS.get(dataset)
    if entry is None:
        raise ValueError(
            f"unknown dataset {dataset!r}; scripts/prepare_data.py prepares "
            f"{', '.join(catalogue.PAPER_DATASETS)}"
        )
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    source = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(source):
        raise FileNotFoundError(f"--source {source} does not exist; give {entry.source}")
    if entry.kind == "text" and os.path.isdir(source):
        raise IsADirectoryError(f"--source {source} is a directory; give the text file itself")
    if entry.kind != "text" and not os.path.isdir(source):
        raise NotADirectoryError(
            f"--source {source} is not a directory; give the directory that holds the raw files "
            f"({entry.source})"
        )
    target = os.path.join(data_dir, *dataset.split("/"), VERSION)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(
            f"{target} already exists (dataset {dataset!r} is prepared); pass --overwrite "
            "(overwrite=True) to replace it"
        )

    reader = _READERS[entry.kind]
    splits, files, notes = reader(source, progress)
    fingerprint = source_fingerprint(files)
    notes = list(notes) + _checksum_notes(entry, fingerprint)

    if os.path.exists(target):
        shutil.rmtree(target)
    description = (
        f"{entry.title}, prepared by scripts/prepare_data.py from {source} ({entry.papers})."
    )
    write_arrays(
        dataset, splits, data_dir, version=VERSION, description=description,
        num_classes=entry.num_classes,
    )  # fmt: skip
    write_source_record(target, fingerprint)
    loaded = _version_dir(dataset, data_dir)  # the newest version: the one load reads
    if loaded != target:
        notes.append(
            f"{loaded} is a newer version of {dataset!r} in the same data dir; tasks.data.load "
            f"reads that one, not {target}"
        )
    counts = {split: len(next(iter(arrays.values()))) for split, arrays in splits.items()}
    if entry.kind == "text":
        counts = {split: int(arrays["length"].sum()) for split, arrays in splits.items()}
    return Prepared(dataset, target, data_dir, counts, entry.num_classes, tuple(notes))


def _bar(items, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="file", disable=not progress)


# ----------------------------------------------------------------------------------------------
# MNIST: IDX files.


def _read_mnist(source: str, progress: bool):
    files = idx_lib.find_idx_splits(source)
    extra = sorted(set(files) - {"train", "test"})
    if extra:
        raise DataFileError(
            f"{source}: IDX files of split(s) {extra} besides MNIST's train-* and t10k-*; give a "
            "directory with MNIST's files only"
        )
    splits = {}
    for split, (images_path, labels_path) in _bar(list(files.items()), "reading mnist", progress):
        arrays = idx_lib.read_idx_split(images_path, labels_path)
        images = arrays["image"]
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            raise idx_lib.IdxFormatError(
                f"{images_path}: {images.shape[1]}x{images.shape[2]} {images.dtype} images; "
                "MNIST images are 28x28 uint8"
            )
        check_labels(arrays["label"], 10, labels_path)
        splits[split] = arrays
    notes = []
    if set(splits) == {"test"}:
        n = len(splits["test"]["label"])
        n_test = max(1, round(0.2 * n))
        n_valid = max(1, round(0.1 * (n - n_test)))
        notes.append(
            f"only the t10k-* files: the prepared 'mnist' has a test split of {n:,} alone, and "
            f"tasks.data.load holds out {n - n_test - n_valid:,} train / {n_valid:,} valid / "
            f"{n_test:,} test examples from it (fixed seeds), as dataset='idx:{source}' does"
        )
    return splits, [f for pair in files.values() for f in pair], notes


# ----------------------------------------------------------------------------------------------
# CIFAR-10: python pickles.


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, strings and numbers; refuses everything else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # protocol-2 pickles of bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it refers to {module}.{name}; a CIFAR-10 batch holds only arrays, lists and "
            "strings, and nothing else is unpickled"
        )


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataFileError(
            f"{path}: not a readable CIFAR-10 batch pickle ({_one_line(e)})"
        ) from None
    if not isinstance(batch, dict):
        raise DataFileError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_batch(path: str, num_classes: int) -> dict[str, np.ndarray]:
    batch = _unpickle(path)
    missing = {"data", "labels"} - set(batch)
    if missing:
        raise DataFileError(
            f"{path}: not a CIFAR-10 batch: no {sorted(missing)} entries (it has {sorted(batch)})"
        )
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_VALUES:
        raise DataFileError(
            f"{path}: 'data' is {data.dtype} {data.shape}; CIFAR-10 batches hold uint8 "
            f"[n, {_IMAGE_VALUES}] rows (3 x 32 x 32, channel-major)"
        )
    labels = np.asarray(batch["labels"])
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataFileError(
            f"{path}: {len(data)} images but {labels.size} labels; they must match one to one"
        )
    check_labels(labels, num_classes, path)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return {"image": np.ascontiguousarray(images), "label": labels.astype(np.int64)}


def _read_cifar10(source: str, progress: bool):
    directory = source
    if os.path.isdir(os.path.join(source, "cifar-10-batches-py")):
        directory = os.path.join(source, "cifar-10-batches-py")
    paths = [os.path.join(directory, f) for f in _CIFAR_FILES]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{directory}: missing CIFAR-10 batch file(s) {', '.join(missing)}; give the "
            "cifar-10-batches-py directory unpacked from cifar-10-python.tar.gz "
            "(data_batch_1..5, test_batch)"
        )
    batches = {
        os.path.basename(p): _cifar_batch(p, 10) for p in _bar(paths, "reading cifar10", progress)
    }
    train = [batches[f] for f in _CIFAR_FILES[:-1]]
    splits = {
        "train": {k: np.concatenate([b[k] for b in train]) for k in ("image", "label")},
        "test": batches["test_batch"],
    }
    return splits, paths, []


# ----------------------------------------------------------------------------------------------
# ImageNet 32x32: downsampled-ImageNet npz files.


def _find_npz(source: str) -> tuple[list[str], str | None]:
    """(train_data_batch_*.npz in numeric order, val_data.npz) in ``source`` or one level down
    (the two zips unpack into directories of their own)."""
    train, val = [], None
    for root in [source] + sorted(
        os.path.join(source, d) for d in os.listdir(source)
        if os.path.isdir(os.path.join(source, d))
    ):  # fmt: skip
        for entry in os.listdir(root):
            if _NPZ_TRAIN_RE.match(entry):
                train.append(os.path.join(root, entry))
            elif entry == "val_data.npz" and val is None:
                val = os.path.join(root, entry)
    train.sort(key=lambda p: int(_NPZ_TRAIN_RE.match(os.path.basename(p)).group(1)))
    return train, val


def _npz_batch(path: str, num_classes: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"data", "labels"} <= keys:
                raise DataFileError(
                    f"{path}: not a downsampled-ImageNet batch: no 'data'/'labels' arrays (it has "
                    f"{sorted(keys)})"
                )
            data, labels = z["data"], z["labels"]
    except DataFileError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, zlib and numpy raise many types
        raise DataFileError(f"{path}: not a readable .npz file ({_one_line(e)})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_VALUES:
        hint = " (that is a larger download; this needs the 32x32 one)" if data.ndim == 2 else ""
        raise DataFileError(
            f"{path}: 'data' is {data.dtype} {data.shape}; ImageNet 32x32 batches hold uint8 "
            f"[n, {_IMAGE_VALUES}] rows (3 x 32 x 32, channel-major){hint}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DataFileError(
            f"{path}: {len(data)} images but 'labels' is {labels.dtype} {labels.shape}; expected "
            f"{len(data)} integer labels"
        )
    bad = (labels < 1) | (labels > num_classes)
    if bad.any():
        first = int(np.argmax(bad))
        raise LabelRangeError(
            f"{path}: label {int(labels[first])} at index {first} is outside 1..{num_classes} "
            f"(downsampled-ImageNet labels are 1-based); {int(bad.sum())} of {len(labels)} labels "
            "lie outside it"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return {"image": np.ascontiguousarray(images), "label": labels.astype(np.int64) - 1}


def _read_imagenet32(source: str, progress: bool):
    train, val = _find_npz(source)
    if not train or val is None:
        missing = "train_data_batch_*.npz" if not train else "val_data.npz"
        raise FileNotFoundError(
            f"{source}: no {missing}; unzip Imagenet32_train_npz.zip and Imagenet32_val_npz.zip "
            "(https://image-net.org/download-images) into it"
        )
    batches = [_npz_batch(p, 1000) for p in _bar(train + [val], "reading imagenet32", progress)]
    splits = {
        "train": {k: np.concatenate([b[k] for b in batches[:-1]]) for k in ("image", "label")},
        "validation": batches[-1],
    }
    return splits, train + [val], []


# ----------------------------------------------------------------------------------------------
# Text.


def _read_text(source: str, progress: bool):
    [raw] = [read_text_file(p) for p in _bar([source], "reading text", progress)]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFormatError(
            f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); the character tokenizer "
            "needs UTF-8"
        ) from None
    return text_chunks(raw), [source], []


_READERS: dict[str, Callable] = {
    "idx": _read_mnist,
    "cifar_pickle": _read_cifar10,
    "imagenet_npz": _read_imagenet32,
    "text": _read_text,
}


def _checksum_notes(entry: catalogue.PaperDataset, fingerprint: list[dict]) -> list[str]:
    """A note per raw file whose sha256 differs from the one published for its name."""
    known = dict(entry.sha256)
    notes = []
    for f in fingerprint:
        want = known.get(os.path.basename(f["path"]))
        if want is not None and f["sha256"] != want:
            notes.append(
                f"{f['path']}: sha256 {f['sha256'][:12]}... differs from the published "
                f"{want[:12]}... for {entry.title}'s {os.path.basename(f['path'])}; prepared it "
                "anyway"
            )
    return notes
