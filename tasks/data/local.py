"""Local files (``idx:DIR``, ``text:FILE``) converted once into array_record.

A directory of MNIST-format IDX files or a plain or gzipped text file is parsed on first use
(``tasks.idx``; :func:`read_text_file`) and written with ``write_arrays`` into the data dir,
under a name derived from its path, with a record of each file's size, mtime and sha256
(:data:`SOURCE_RECORD`). Later reads go through the array_record copy like any other dataset.
A file whose sha256 changed since (recomputed only when its size or times change) is converted
again with a ``StaleDataWarning``, so the copy never serves stale data.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import warnings
import zlib
from collections.abc import Sequence

import numpy as np

from tasks import idx as idx_lib
from tasks.data.locate import _check_text_file
from tasks.data.store import _one_line, write_arrays
from tasks.errors import StaleDataError, StaleDataWarning, TextFormatError

_TEXT_CHUNK = 1 << 16  # bytes per array_record example of a local text corpus


SOURCE_RECORD = "lopt_source.json"  # in a converted dataset's version dir: its source files
_LOCAL_VERSION = "1.0.0"
# (data_dir, name) -> content token of the sources this process last checked it against.
_checked: dict[tuple[str, str], str] = {}


def _local_name(kind: str, path: str) -> str:
    """The dataset name of local files at ``path``: a slug of its name and a hash of its
    absolute path (their content is checked against the converted copy's record)."""
    path = os.path.abspath(path)
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    base = os.path.basename(os.path.normpath(path)).lower()
    slug = re.sub(r"[^a-z0-9]+", "_", base).strip("_")[:32]
    return f"{kind}_{slug}_{digest}" if slug else f"{kind}_{digest}"


def _prepared(name: str, data_dir: str, version: str = _LOCAL_VERSION) -> bool:
    """Whether ``data_dir/NAME/VERSION`` holds a ``dataset_info.json``; ``version`` defaults to
    the one this package writes its own datasets at (local files, digits, generated text)."""
    return os.path.isfile(os.path.join(data_dir, name, version, "dataset_info.json"))


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """sha256 of ``path``; cached on its size, times and inode, so a file is hashed again only
    when one of them changed (ctime changes on every write, even when mtime is put back)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(files: Sequence[str]) -> list[dict]:
    """``[{"path", "size", "mtime_ns", "sha256"}]`` of ``files`` (sorted by absolute path)."""
    out = []
    for path in sorted(os.path.abspath(f) for f in files):
        st = os.stat(path)
        sha = _sha256(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        out.append({"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
    return out


def write_source_record(version_dir: str, fingerprint: list[dict]) -> None:
    """Record which files (:func:`source_fingerprint`) a dataset was converted from."""
    path = os.path.join(version_dir, SOURCE_RECORD)
    with open(path + ".tmp", "w") as f:
        json.dump({"files": fingerprint}, f, indent=1)
    os.replace(path + ".tmp", path)


def _stale_reason(version_dir: str, fingerprint: list[dict]) -> str | None:
    """Why the copy in ``version_dir`` does not hold the files ``fingerprint`` describes, or
    None if it does (same paths, same sha256; a new mtime alone is not a change)."""
    try:
        with open(os.path.join(version_dir, SOURCE_RECORD)) as f:
            recorded = {e["path"]: e for e in json.load(f)["files"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return (
            f"{version_dir} has no readable record ({SOURCE_RECORD}) of the files it was "
            f"converted from ({_one_line(e)})"
        )
    now = {e["path"]: e for e in fingerprint}
    if set(recorded) != set(now):
        added, removed = sorted(set(now) - set(recorded)), sorted(set(recorded) - set(now))
        return (
            f"the source files of {version_dir} changed since it was converted (new: "
            f"{added or 'none'}; gone: {removed or 'none'})"
        )
    for path, entry in now.items():
        old = recorded[path]
        if old.get("sha256") != entry["sha256"]:
            return (
                f"{path} changed since it was converted into {version_dir} (sha256 "
                f"{str(old.get('sha256'))[:12]}... -> {entry['sha256'][:12]}..., size "
                f"{old.get('size')} -> {entry['size']} bytes, mtime_ns {old.get('mtime_ns')} -> "
                f"{entry['mtime_ns']})"
            )
    return None


def _convert_local(
    kind: str, path: str, files: list[str], convert, data_dir: str
) -> tuple[str, str]:
    """Convert local ``files`` once into the dataset ``_local_name(kind, path)``; its name and
    a token of the files' content.

    ``convert()`` parses the files into ``(splits, num_classes, description)`` for
    :func:`write_arrays`. Each conversion records the files' fingerprints in the copy; a later
    call whose files differ from the record (by sha256, or in which files there are) warns
    with :class:`StaleDataWarning` and converts again, so stale data is never served. If the
    stale copy cannot be removed, :class:`StaleDataError`.
    """
    name = _local_name(kind, path)
    fingerprint = source_fingerprint(files)
    token = hashlib.sha1(
        json.dumps([(e["path"], e["sha256"]) for e in fingerprint]).encode()
    ).hexdigest()
    key = (data_dir, name)
    if _checked.get(key) == token and _prepared(name, data_dir):
        return name, token
    vdir = os.path.join(data_dir, name, _LOCAL_VERSION)
    if _prepared(name, data_dir) and _stale_reason(vdir, fingerprint) is None:
        _checked[key] = token
        return name, token
    # Parse (and so check) every file before anything is written or removed.
    splits, num_classes, description = convert()
    os.makedirs(data_dir, exist_ok=True)
    # Not write_arrays' lock file: flock does not nest on two descriptors of one file.
    with open(os.path.join(data_dir, f".{name}.source.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _prepared(name, data_dir):  # stale, unless another process just rebuilt it
            reason = _stale_reason(vdir, fingerprint)
            if reason is not None:
                warnings.warn(f"{reason}; reconverting it", StaleDataWarning, stacklevel=5)
                try:
                    shutil.rmtree(vdir)
                except OSError as e:
                    raise StaleDataError(
                        f"{reason}, and the stale copy cannot be removed to convert it again "
                        f"({_one_line(e)}); delete {vdir} or use a writable data_dir"
                    ) from None
        if not _prepared(name, data_dir):
            write_arrays(
                name, splits, data_dir, description=description, num_classes=num_classes
            )
            write_source_record(vdir, fingerprint)
    _checked[key] = token
    return name, token


def read_idx_dir(directory: str) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """``({split: {"image", "label"}}, num_classes)`` from the IDX files in ``directory``."""
    files = idx_lib.find_idx_splits(directory)
    splits = {split: idx_lib.read_idx_split(*pair) for split, pair in files.items()}
    shapes = {s: (a["image"].shape[1:], a["image"].dtype.name) for s, a in splits.items()}
    if len(set(shapes.values())) > 1:
        raise idx_lib.IdxFormatError(
            f"{directory}: the IDX files hold images of different sizes or types: {shapes}"
        )
    return splits, 1 + max(int(a["label"].max()) for a in splits.values())


def _local_idx(path: str, data_dir: str) -> tuple[str, str]:
    """Convert the IDX files in directory ``path`` into array_record once; (name, token)."""
    directory = os.path.abspath(os.path.expanduser(path))
    files = idx_lib.find_idx_splits(directory)

    def convert():
        splits, num_classes = read_idx_dir(directory)
        return splits, num_classes, f"MNIST-format IDX files from {directory}"

    all_files = [f for pair in files.values() for f in pair]
    return _convert_local("idx", directory, all_files, convert, data_dir)


def read_text_file(path: str) -> bytes:
    """The bytes of a text file, gunzipped if it is gzip (by its content); errors name it."""
    _check_text_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise TextFormatError(f"{path}: truncated or corrupt gzip data ({e})") from None
    if not raw:
        raise TextFormatError(f"text file {path} is empty")
    return raw


def text_chunks(raw: bytes) -> dict[str, dict[str, np.ndarray]]:
    """A corpus as one ``train`` split of fixed-size byte chunks (+ their lengths): the form
    :func:`load_text` reads back."""
    n = len(raw)
    num_chunks = -(-n // _TEXT_CHUNK)
    buf = np.zeros(num_chunks * _TEXT_CHUNK, np.uint8)
    buf[:n] = np.frombuffer(raw, np.uint8)
    lengths = np.full(num_chunks, _TEXT_CHUNK, np.int32)
    lengths[-1] = n - (num_chunks - 1) * _TEXT_CHUNK
    return {"train": {"bytes": buf.reshape(num_chunks, _TEXT_CHUNK), "length": lengths}}


def _local_text(path: str, data_dir: str) -> tuple[str, str]:
    """Convert the text file ``path`` (plain or gzipped) into array_record once; (name, token)."""
    path = os.path.abspath(os.path.expanduser(path))
    _check_text_file(path)

    def convert():
        return text_chunks(read_text_file(path)), None, f"text file {path}"

    return _convert_local("text", path, [path], convert, data_dir)
