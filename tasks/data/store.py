"""array_record storage: tensorflow-datasets' on-disk format, read and written without TensorFlow.

:func:`write_arrays` writes numpy arrays as a tfds dataset directory
``DATA_DIR/NAME[/CONFIG]/VERSION/`` (``dataset_info.json`` and ``*.array_record*`` shards)
through a ``tfds.core.GeneratorBasedBuilder`` with raw-bytes Tensor features, so dtypes and
values round-trip exactly; :func:`read_arrays` reads any prepared dataset back into numpy.
``_open`` checks a prepared directory (its ``dataset_info.json``, that every listed shard exists
and holds the examples recorded) before it hands out tfds' pure-numpy random-access
``ArrayRecordDataSource``s, so a damaged copy fails with a first line naming the file instead of
part-way through training.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from collections.abc import Mapping

import numpy as np

from tasks.data.locate import _VERSION_RE, _reprepare_hint, _resolve, _version_dir
from tasks.errors import CorruptDatasetError, DatasetFileMissingError

_READ_CHUNK = 4096  # examples decoded per __getitems__ call

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_CONFIG_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
_SPLIT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _validate(
    name: str, splits: Mapping, version: str, num_classes: int | None
) -> dict[str, dict[str, np.ndarray]]:
    dataset, _, config = name.partition("/") if isinstance(name, str) else (None, "", "")
    if (
        not isinstance(name, str)
        or not _NAME_RE.match(dataset)
        or ("/" in name and not _CONFIG_RE.match(config))
    ):
        raise ValueError(
            "write_arrays: dataset name must be lower-case letters, digits and underscores, "
            "starting with a letter, optionally followed by /CONFIG (a tfds name such as "
            f"'imagenet_resized/32x32', without version), got {name!r}"
        )
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"write_arrays: version must look like '1.0.0', got {version!r}")
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError("write_arrays: splits must be a non-empty dict {split: {key: array}}")
    out: dict[str, dict[str, np.ndarray]] = {}
    spec = None  # per-example (shape, dtype) by key, shared by all splits
    for split, arrays in splits.items():
        where = f"write_arrays({name!r}): split {split!r}"
        if not isinstance(split, str) or not _SPLIT_RE.match(split):
            raise ValueError(f"{where}: split names must be letters, digits and underscores")
        if not isinstance(arrays, Mapping) or not arrays:
            raise ValueError(f"{where} must be a non-empty dict of arrays")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        for key, a in arrays.items():
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise ValueError(f"{where}: bad feature name {key!r}")
            if a.ndim == 0 or a.dtype.kind not in "biuf":
                raise ValueError(
                    f"{where}: {key!r} must be a bool/int/float array with a leading example "
                    f"axis, got dtype {a.dtype} and shape {a.shape}"
                )
        lengths = {k: len(a) for k, a in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{where}: arrays have unequal lengths {lengths}")
        if not next(iter(lengths.values())):
            raise ValueError(f"{where} is empty (0 examples)")
        this = {k: (a.shape[1:], a.dtype) for k, a in arrays.items()}
        if spec is not None and this != spec:
            raise ValueError(
                f"{where}: keys, per-example shapes or dtypes {this} differ from the other splits' "
                f"{spec}"
            )
        spec = this
        out[split] = arrays
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"write_arrays: num_classes must be an int >= 1, got {num_classes!r}")
        shape, dtype = spec.get("label", (None, None))
        if shape != () or dtype.kind not in "iu":
            raise ValueError(
                "write_arrays: num_classes needs an integer 'label' array of shape [n], got "
                + ("no 'label'" if shape is None else f"dtype {dtype}, per-example shape {shape}")
            )
        for split, arrays in out.items():
            labels = arrays["label"]
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(
                    f"write_arrays({name!r}): split {split!r} has labels outside "
                    f"[0, {num_classes}): min {labels.min()}, max {labels.max()}"
                )
    return out


def write_arrays(
    name: str,
    splits: dict[str, dict[str, np.ndarray]],
    data_dir: str | None = None,
    *,
    version: str = "1.0.0",
    description: str = "",
    num_classes: int | None = None,
) -> str:
    """Write numpy arrays as the array_record tfds dataset ``NAME/VERSION`` in ``data_dir``.

    Args:
      name: snake_case dataset name, optionally with a builder config (``"NAME/CONFIG"``, as
        tfds writes ``imagenet_resized/32x32``), no version.
      splits: ``{split: {key: array}}``; within a split all arrays share their leading (example)
        length, and every split has the same keys, per-example shapes and dtypes.
      data_dir: tfds data dir; defaults to :func:`default_data_dir`.
      version: dataset version, ``"X.Y.Z"``.
      description: stored in ``dataset_info.json``.
      num_classes: if given, ``"label"`` is stored as a ``tfds.features.ClassLabel`` (read back
        as int64) so readers find the class count in the dataset info.

    Every other array becomes a ``tfds.features.Tensor`` of its per-example shape and dtype with
    raw-bytes encoding, so :func:`read_arrays` returns it bit for bit. Examples keep their order.
    Concurrent writers of one dataset serialise on a file lock in ``data_dir``; if the dataset is
    already prepared this does nothing (it does not compare contents).

    Returns:
      The dataset directory ``data_dir/NAME[/CONFIG]/VERSION``.
    """
    arrays = _validate(name, splits, version, num_classes)
    dataset, _, config = name.partition("/")
    data_dir = _resolve(data_dir)
    target = os.path.join(data_dir, dataset, *([config] if config else []), version)
    if os.path.isfile(os.path.join(target, "dataset_info.json")):
        return target
    os.makedirs(data_dir, exist_ok=True)
    lock_name = f".{name.replace('/', '-')}-{version}.lock"
    with open(os.path.join(data_dir, lock_name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.isfile(os.path.join(target, "dataset_info.json")):
            builder = _builder_class(dataset, config, version, description, arrays, num_classes)
            with tempfile.TemporaryDirectory() as downloads:  # keep data_dir free of downloads/
                builder(
                    data_dir=data_dir, config=config or None, file_format="array_record"
                ).download_and_prepare(download_dir=downloads)
    return target


def _builder_class(
    dataset_name: str,
    config: str,
    version: str,
    description: str,
    splits: dict[str, dict[str, np.ndarray]],
    num_classes: int | None,
) -> type:
    """A GeneratorBasedBuilder, unregistered, that writes ``splits`` in order."""
    import tensorflow_datasets as tfds

    first = next(iter(splits.values()))
    features = {
        key: tfds.features.Tensor(
            shape=a.shape[1:], dtype=a.dtype, encoding=tfds.features.Encoding.BYTES
        )
        for key, a in first.items()
    }
    if num_classes is not None:
        features["label"] = tfds.features.ClassLabel(num_classes=num_classes)

    class ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version(version)
        if config:
            BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)]
        # No code directory (checksums, metadata files). Left to tfds, finding it for a class
        # defined in a package imports `importlib_resources`, which tfds does not install.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=description,
                features=tfds.features.FeaturesDict(features),
                disable_shuffling=True,  # keep the arrays' order
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(a) for split, a in splits.items()}

        def _generate_examples(self, arrays):
            for i in range(len(next(iter(arrays.values())))):
                yield i, {key: a[i] for key, a in arrays.items()}

    return ArrayBuilder


def _open(name: str, data_dir: str, version: str | None = None):
    """(``{split: ArrayRecordDataSource}``, features, version dir) of a prepared dataset.

    Checked before anything is read: ``dataset_info.json`` parses, tfds can build the dataset's
    features from the directory, every shard it lists exists, and each split's shards hold the
    number of examples it records. Any failure is a :class:`CorruptDatasetError` (a missing
    file: :class:`DatasetFileMissingError`) whose first line names the file.
    """
    vdir = _version_dir(name, data_dir, version)
    name = name.partition(":")[0].strip("/")
    hint = _reprepare_hint(name, data_dir, vdir)
    info_path = os.path.join(vdir, "dataset_info.json")
    try:
        with open(info_path, "rb") as f:
            info = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptDatasetError(
            f"{info_path}: unreadable dataset_info.json ({_one_line(e)}); {hint}"
        ) from None
    if not isinstance(info, dict) or not isinstance(info.get("splits"), list):
        raise CorruptDatasetError(
            f"{info_path}: dataset_info.json is not a tfds dataset info (no list of splits); "
            f"{hint}"
        )
    import tensorflow_datasets as tfds

    # A read-only builder from the directory: works for any dataset, registered or not, and
    # cannot download (tfds.data_source would build the registered catalogue class instead).
    try:
        builder = tfds.builder_from_directory(vdir)
        features = builder.info.features
        split_infos = dict(builder.info.splits.items())
    except Exception as e:  # noqa: BLE001 - tfds raises many types for bad metadata
        raise CorruptDatasetError(
            f"{vdir}: tfds cannot read the dataset's metadata ({_one_line(e)}); {hint}"
        ) from None
    from array_record.python.array_record_module import ArrayRecordReader

    for split, split_info in split_infos.items():
        paths = [os.fspath(p) for p in split_info.filepaths]
        where = f"shard {{}} of {len(paths)} of split {split!r}"
        for i, path in enumerate(paths):
            if not os.path.isfile(path):
                raise DatasetFileMissingError(
                    f"{path}: missing {where.format(i + 1)} (listed in {info_path}); {hint}"
                )
        for i, (path, want) in enumerate(zip(paths, split_info.shard_lengths)):
            try:  # reads the shard's footer only
                reader = ArrayRecordReader(path)
                have = reader.num_records()
                reader.close()
            except Exception as e:  # noqa: BLE001 - array_record raises RuntimeError and others
                raise CorruptDatasetError(
                    f"{path}: unreadable array_record {where.format(i + 1)} ({_one_line(e)}); "
                    f"{hint}"
                ) from None
            if have != want:
                raise CorruptDatasetError(
                    f"{path}: {where.format(i + 1)} holds {have} examples but {info_path} records "
                    f"{want} (cut short or replaced); {hint}"
                )
    try:
        sources = builder.as_data_source(file_format="array_record")
    except Exception as e:  # noqa: BLE001 - tfds raises many types
        raise CorruptDatasetError(
            f"{vdir}: cannot open the array_record shards ({_one_line(e)}); {hint}"
        ) from None
    return sources, features, vdir


def _one_line(error: BaseException) -> str:
    """``error`` as ``Type: first line`` (for embedding in a one-line message)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _read_source(source, features, keys=None, where: str = "") -> dict[str, np.ndarray]:
    """All examples of one split as stacked arrays, decoded ``_READ_CHUNK`` at a time."""
    n = len(source)
    keys = list(features.keys()) if keys is None else list(keys)
    out: dict[str, np.ndarray] = {}
    for start in range(0, n, _READ_CHUNK):
        try:
            examples = source.__getitems__(list(range(start, min(n, start + _READ_CHUNK))))
        except Exception as e:  # noqa: BLE001 - a damaged shard fails inside array_record
            raise CorruptDatasetError(
                f"{where or 'dataset'}: cannot read examples {start}.."
                f"{min(n, start + _READ_CHUNK) - 1} ({_one_line(e)}); a shard is damaged"
            ) from None
        for key in keys:
            dtype = getattr(features[key], "np_dtype", None)
            block = np.asarray([e[key] for e in examples], dtype=dtype)
            if key not in out:
                out[key] = np.empty((n, *block.shape[1:]), block.dtype)
            if block.shape[1:] != out[key].shape[1:]:
                raise ValueError(f"{key!r} has examples of different shapes; cannot stack them")
            out[key][start : start + len(examples)] = block
    return out


def read_arrays(
    name: str, data_dir: str | None = None, version: str | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Read a prepared array_record dataset into ``{split: {key: array}}``.

    ``name`` may carry a config and version as in tfds (``"imagenet_resized/32x32:0.1.0"``);
    without a version the newest prepared one is read. Round trip with :func:`write_arrays` is
    exact. Raises :class:`DatasetNotPreparedError` (a filesystem check) if it is not prepared.
    """
    sources, features, vdir = _open(name, _resolve(data_dir), version)
    return {
        split: _read_source(src, features, where=f"{vdir} (split {split!r})")
        for split, src in sources.items()
    }
