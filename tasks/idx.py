"""Reading MNIST-format IDX files (LeCun et al., "THE MNIST DATABASE", file-format section).

An IDX file is a 4-byte magic number ``0x00 0x00 TYPE NDIM``, then ``NDIM`` big-endian uint32
dimension sizes, then the array's items, big-endian, in C order. MNIST images are
``0x00000803`` (uint8, 3-D: ``[n, rows, cols]``), labels ``0x00000801`` (uint8, 1-D). Files may
be gzip-compressed (``*.gz``, as distributed); compression is detected from the content.

:func:`read_idx` reads one file; :func:`find_idx_splits` pairs the image and label files of a
directory into splits (``train-*`` -> ``train``, ``t10k-*``/``test-*`` -> ``test``). Every
malformed input raises an error whose first line names the file and the fault:
:class:`FileNotFoundError` for missing files; :class:`IdxFormatError` (a
``tasks.errors.DataFileError``, so a ``ValueError``) for a wrong magic number, a truncated
header, data or gzip stream, trailing bytes, image or label files of the wrong type, or image
and label files that disagree; ``tasks.errors.LabelRangeError`` for negative labels.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib

import numpy as np

from tasks.errors import DataFileError, LabelRangeError

# IDX type codes -> big-endian numpy dtypes.
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_RE = re.compile(
    r"^(?P<prefix>.+?)[-_.](?P<kind>images|labels)[-_.]idx(?P<ndim>[13])-ubyte(?P<gz>\.gz)?$"
)
_SPLIT_NAMES = {"train": "train", "t10k": "test", "test": "test"}
EXPECTED = "PREFIX-images-idx3-ubyte[.gz] and PREFIX-labels-idx1-ubyte[.gz]"


class IdxFormatError(DataFileError):
    """A file is not a well-formed IDX file (the message names the file)."""


def _read_bytes(path: str) -> bytes:
    if os.path.isdir(path):
        raise IsADirectoryError(f"IDX file {path} is a directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise IdxFormatError(f"{path}: truncated or corrupt gzip data ({e})") from None


def read_idx(path: str, expected_ndim: int | None = None) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzip-compressed or not), in native byte order.

    Args:
      path: the file.
      expected_ndim: if given, the number of dimensions the file must declare (3 for images,
        1 for labels), so swapped files fail with a message saying so.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IdxFormatError(
            f"{path}: truncated IDX file: {len(raw)} bytes, shorter than the 4-byte magic number"
        )
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] or raw[1] or code not in _DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{path}: wrong magic number 0x{magic:08x}; not an IDX file (an IDX file starts with "
            "0x0000TTDD, type TT in 08 09 0b 0c 0d 0e and DD dimensions: MNIST images 0x00000803, "
            "labels 0x00000801)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        what = {3: "images", 1: "labels"}.get(expected_ndim, f"{expected_ndim}-D")
        raise IdxFormatError(
            f"{path}: magic number 0x{magic:08x} declares a {ndim}-D array, but {what} files "
            f"are {expected_ndim}-D (magic 0x0000{code:02x}{expected_ndim:02x}); are the images "
            "and labels files swapped?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(
            f"{path}: truncated IDX header: {ndim} dimension sizes need {header} bytes, the file "
            f"has {len(raw)}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _DTYPES[code]
    want = int(np.prod(shape)) * dtype.itemsize
    have = len(raw) - header
    if have < want:
        raise IdxFormatError(
            f"{path}: truncated IDX file: the header declares a {dtype.name} array of shape "
            f"{shape} ({want} bytes of data) but only {have} bytes follow"
        )
    if have > want:
        raise IdxFormatError(
            f"{path}: {have - want} unexpected bytes after the {dtype.name} array of shape {shape} "
            "that the header declares (a corrupt or concatenated file?)"
        )
    array = np.frombuffer(raw, dtype, count=int(np.prod(shape)), offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def find_idx_splits(directory: str) -> dict[str, tuple[str, str]]:
    """``{split: (images_path, labels_path)}`` for the IDX files in ``directory``.

    Files are named ``PREFIX-images-idx3-ubyte`` and ``PREFIX-labels-idx1-ubyte`` (``.`` or
    ``_`` also separate the parts; either may end in ``.gz``). ``train`` becomes the split
    ``train``, ``t10k`` and ``test`` become ``test``, any other prefix its own split name.
    Where a file exists both plain and gzipped, the plain one is read.
    """
    if not os.path.exists(directory):
        raise FileNotFoundError(f"IDX directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise NotADirectoryError(
            f"{directory} is not a directory; give the directory that holds the IDX files "
            f"({EXPECTED})"
        )
    found: dict[str, dict[str, str]] = {}
    for entry in sorted(os.listdir(directory), key=lambda e: (e.endswith(".gz"), e)):
        m = _FILE_RE.match(entry)
        if m is None:
            continue
        prefix = m["prefix"].lower()
        split = _SPLIT_NAMES.get(prefix) or re.sub(r"[^a-z0-9_]", "_", prefix)
        if not split[0].isalpha():
            split = "s_" + split
        found.setdefault(split, {}).setdefault(m["kind"], os.path.join(directory, entry))
    if not found:
        raise FileNotFoundError(
            f"no IDX files in {directory}: expected {EXPECTED} (for example "
            "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz)"
        )
    splits = {}
    for split, files in found.items():
        for have, other, ndim in (("images", "labels", 1), ("labels", "images", 3)):
            if have in files and other not in files:
                stem = os.path.basename(files[have]).split(have)[0]
                raise FileNotFoundError(
                    f"{files[have]} has no matching {other} file: expected "
                    f"{os.path.join(directory, stem + other)}-idx{ndim}-ubyte[.gz]"
                )
        splits[split] = (files["images"], files["labels"])
    return splits


def read_idx_split(images_path: str, labels_path: str) -> dict[str, np.ndarray]:
    """``{"image": [n, rows, cols], "label": int64 [n]}`` from a pair of IDX files.

    Images must be uint8 (``0x08``, as in MNIST) or float (``0x0d``, ``0x0e``): the data layer
    scales integer images by their type's maximum, which is wrong for signed types. Labels must
    be non-negative integers, as many as there are images.
    """
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype.kind not in "uf":  # IDX's only unsigned type is uint8
        code = next(c for c, d in _DTYPES.items() if d.newbyteorder("=") == images.dtype)
        raise IdxFormatError(
            f"{images_path}: images of type {images.dtype.name} (IDX type 0x{code:02x}); image "
            "files hold uint8 (0x08, as MNIST does) or float (0x0d, 0x0e) pixels"
        )
    if labels.dtype.kind not in "iu":
        raise IdxFormatError(
            f"{labels_path}: labels of type {labels.dtype.name}; label files hold integers "
            "(IDX type 0x08, 0x09, 0x0b or 0x0c)"
        )
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; they must match one to one"
        )
    if len(labels) and labels.min() < 0:
        first = int(np.argmax(labels < 0))
        raise LabelRangeError(
            f"{labels_path}: negative label {int(labels[first])} at index {first} "
            f"({int((labels < 0).sum())} of {len(labels)} labels are negative); class labels "
            "are 0, 1, 2, ..."
        )
    return {"image": images, "label": labels.astype(np.int64)}
