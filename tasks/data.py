"""Datasets for inner problems: tensorflow-datasets without TensorFlow (DESIGN.md, "datasets").

Every dataset, whether a tfds catalogue dataset or one of our own, is read the same way: from a
tfds directory ``DATA_DIR/NAME[/CONFIG]/VERSION/`` holding ``dataset_info.json`` and
``*.array_record*`` shards, through tfds' random-access data source (``ArrayRecordDataSource``).
That reader is pure numpy; TensorFlow is never imported.

* :func:`write_arrays` turns numpy arrays into such a directory through a
  ``tfds.core.GeneratorBasedBuilder`` (Tensor features, raw-bytes encoding, so dtypes and values
  round-trip exactly); :func:`read_arrays` reads any prepared dataset back into numpy.
* :func:`load` returns a :class:`Dataset` of device-resident image/label splits
  ``train``/``valid``/``test``, the form task families sample batches from inside jit.
  ``load("digits")`` is the embedded default (scikit-learn's 8x8 digits, written on first use
  as the dataset ``lopt_digits``); any other name is a catalogue dataset prepared beforehand.

This layer never downloads. Whether a dataset is prepared is decided on the filesystem before
tfds is asked anything, so a missing one raises :class:`DatasetNotPreparedError` at once, with
the command that prepares it, instead of tfds trying the network. The paper datasets (MNIST,
CIFAR-10, ImageNet 32x32, Tiny Shakespeare; ``tasks.catalogue``) are prepared from raw files a
user downloaded with ``python scripts/prepare_data.py`` (``tasks.prepare``); other catalogue
datasets with ``tfds build`` / ``tfds convert_format``, which need TensorFlow, elsewhere. The
data dir is ``$LOPT_DATA_DIR``, else ``$TFDS_DATA_DIR``, else ``~/.cache/lopt/tensorflow_datasets``
(:func:`default_data_dir`).

Local files take the same path. A dataset name ``"idx:DIR"`` names a directory of MNIST-format
IDX files (``train-images-idx3-ubyte.gz`` ...), ``"text:FILE"`` a plain (or gzipped) text
corpus. On first use they are parsed (``tasks.idx``) and written with :func:`write_arrays` into
the data dir, under a name derived from their path, with a record of each file's size,
modification time and sha256; every later read goes through the array_record copy like any
other dataset. A file that changed since (by its sha256, recomputed when its size or times
change) is reconverted, with a :class:`StaleDataWarning` that says so; the copy never serves
stale data.

Bad inputs fail before any training starts, with a first line that names the file and the
fault (``tasks.errors``): malformed IDX or text files, labels outside ``[0, num_classes)``,
a prepared directory whose ``dataset_info.json`` is unreadable or whose shards are missing or
disagree with it.

* :func:`load` also preprocesses images (``resize``, ``channels``, ``scale``, ``classes``; see
  ``tasks.preprocess``), cached per option set.
* :func:`load_text` returns a :class:`TextDataset` of character- or byte-tokenised splits:
  ``"generated"`` (a small corpus generated from a fixed grammar, the embedded default for
  tests), ``"text:FILE"``, or a catalogue text dataset such as ``"tiny_shakespeare"``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tasks import catalogue
from tasks import idx as idx_lib
from tasks import preprocess
from tasks.base import SPLITS
from tasks.errors import (
    CorruptDatasetError,
    DataFileError,
    DatasetFileMissingError,
    DatasetNotPreparedError,
    LabelRangeError,
    StaleDataError,
    StaleDataWarning,
    TextFormatError,
)

DIGITS_DATASET = "lopt_digits"  # on-disk name of the embedded default
DIGITS_TEST_FRACTION = 0.2
_DIGITS_SEED = 0  # fixes the on-disk train/test split of lopt_digits for good
_TEST_SEED = 0  # fixes the test split held out of a dataset that has only one split
GENERATED_TEXT = "generated"  # load_text's embedded default ...
GENERATED_TEXT_DATASET = "lopt_generated_text"  # ... and its on-disk name
IDX_PREFIX, TEXT_PREFIX = "idx:", "text:"
TOKENIZERS = ("char", "byte")
_TEXT_CHUNK = 1 << 16  # bytes per array_record example of a local text corpus
_READ_CHUNK = 4096  # examples decoded per __getitems__ call

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_CONFIG_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
_SPLIT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def default_data_dir() -> str:
    """The data dir: ``$LOPT_DATA_DIR``, else ``$TFDS_DATA_DIR``, else
    ``~/.cache/lopt/tensorflow_datasets``.

    ``LOPT_DATA_DIR`` wins over tfds' own ``TFDS_DATA_DIR``: it is this project's, so it can
    point this project elsewhere while other tfds users on the machine keep theirs.
    """
    for var in ("LOPT_DATA_DIR", "TFDS_DATA_DIR"):
        if os.environ.get(var):
            return os.environ[var]
    return os.path.join(os.path.expanduser("~"), ".cache", "lopt", "tensorflow_datasets")


def _resolve(data_dir: str | None) -> str:
    return os.path.abspath(os.path.expanduser(default_data_dir() if data_dir is None else data_dir))


# ----------------------------------------------------------------------------------------------
# Locating prepared datasets (filesystem only, never tfds).


def _has_shards(version_dir: str, file_format: str) -> bool:
    return any(f".{file_format}" in f for f in os.listdir(version_dir))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def _version_dir(name: str, data_dir: str, version: str | None = None) -> str:
    """The newest ``data_dir/NAME/VERSION`` with array_record shards, else a helpful error."""
    name, _, name_version = name.partition(":")
    name = name.strip("/")
    version = version or name_version or None
    root = os.path.join(data_dir, *name.split("/"))
    found, unlisted = [], []
    if name and os.path.isdir(root):
        for entry in os.listdir(root):
            path = os.path.join(root, entry)
            if not _VERSION_RE.match(entry) or version not in (None, entry):
                continue
            if os.path.isfile(os.path.join(path, "dataset_info.json")):
                found.append(entry)
            elif os.path.isdir(path) and _has_shards(path, "array_record"):
                unlisted.append(path)
    ready = [v for v in found if _has_shards(os.path.join(root, v), "array_record")]
    if ready:
        return os.path.join(root, max(ready, key=_version_key))
    if unlisted:
        vdir = max(unlisted, key=lambda p: _version_key(os.path.basename(p)))
        raise DatasetFileMissingError(
            f"{os.path.join(vdir, 'dataset_info.json')}: missing, so the array_record shards in "
            f"{vdir} cannot be read; {_reprepare_hint(name, data_dir, vdir)}"
        )
    tfrecord = [v for v in found if _has_shards(os.path.join(root, v), "tfrecord")]
    if tfrecord:
        vdir = os.path.join(root, max(tfrecord, key=_version_key))
        command = f"tfds convert_format --dataset_version_dir={vdir} --out_file_format=array_record"
        raise DatasetNotPreparedError(
            f"dataset {name!r} in {vdir} exists only as TFRecord shards, which need TensorFlow; "
            f"convert it once where TensorFlow is installed: {command}\n"
            "tfds reads TFRecord only through TensorFlow, which this project does not use; random "
            "access needs array_record. The `tfds` command-line tool imports TensorFlow at "
            "start-up, so it does not run in this project's environment. The conversion writes "
            "array_record shards beside the TFRecord ones and records them in dataset_info.json "
            "(add --out_dir=OTHER to write a converted copy elsewhere, then copy it here). Or "
            f"rebuild it: tfds build {name} --file_format=array_record --data_dir={data_dir}",
            dataset=name,
            data_dir=data_dir,
            command=command,
        )
    raise _not_prepared(name, data_dir, root, version)


def _not_prepared(
    name: str, data_dir: str, root: str, version: str | None
) -> DatasetNotPreparedError:
    where = os.path.join(root, version or "<version>")
    looked = (
        f"Looked for {where}{os.sep} holding dataset_info.json and *.array_record* shards; "
        "this layer never downloads."
    )
    build = (
        f"tfds build {name} --file_format=array_record --data_dir={data_dir} (on a machine with "
        f"network access and TensorFlow, which the tfds CLI and most catalogue builders need; "
        f"then copy {os.path.join(data_dir, name.split('/')[0])} here)"
    )
    elsewhere = (
        "Or set LOPT_DATA_DIR (it wins over tfds' TFDS_DATA_DIR) or pass data_dir= to point at "
        "a directory that already holds it."
    )
    command = catalogue.prepare_command(name, data_dir)
    if command is not None:
        entry = catalogue.PAPER_DATASETS[name]
        lines = [
            f"dataset {name!r} is not prepared in data dir {data_dir}; prepare it from raw files "
            f"with: {command}",
            f"Raw files: {entry.title}, {entry.download}.",
            looked,
            f"Other ways: {build}. {elsewhere}",
        ]
    else:
        lines = [
            f"dataset {name!r} is not prepared in data dir {data_dir} (no {where}{os.sep} with "
            "dataset_info.json and *.array_record* shards; this layer never downloads)",
            "To prepare it:",
            f"  * {build};",
            f"  * {elsewhere[0].lower()}{elsewhere[1:]}",
            "  * or write local numpy arrays with tasks.data.write_arrays(name, splits, data_dir).",
        ]
    return DatasetNotPreparedError(
        "\n".join(lines), dataset=name, data_dir=data_dir, command=command
    )


def _reprepare_hint(name: str, data_dir: str, vdir: str) -> str:
    """How to rebuild a prepared dataset whose files are damaged (the end of a one-line error)."""
    if name.startswith(("idx_", "text_", "lopt_")):  # converted by this module on first use
        return f"delete {vdir} and it is rebuilt from its source on the next load"
    command = catalogue.prepare_command(name, data_dir)
    if command is not None:
        return f"prepare it again with: {command} --overwrite"
    return (
        f"prepare it again (tfds build {name} --file_format=array_record) or copy an intact copy "
        f"into {data_dir}"
    )


def with_smoke_hint(
    error: DatasetNotPreparedError, family: str, smoke: str
) -> DatasetNotPreparedError:
    """``error`` with its first line prefixed by ``family`` and ending in the option that runs
    the family on the embedded dataset ``smoke`` instead (for CPU smoke runs)."""
    first, _, rest = str(error).partition("\n")
    message = f'{family}: {first}; or pass dataset="{smoke}" for a CPU smoke run'
    return DatasetNotPreparedError(
        message + (f"\n{rest}" if rest else ""),
        dataset=getattr(error, "dataset", None),
        data_dir=getattr(error, "data_dir", None),
        command=getattr(error, "command", None),
    )


# ----------------------------------------------------------------------------------------------
# Writing and reading numpy arrays.


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


# ----------------------------------------------------------------------------------------------
# Device-resident image-classification datasets.


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


def require(name: str, data_dir: str | None = None) -> None:
    """Fail fast, from the filesystem alone (no file is parsed, tfds is not imported), if the
    dataset ``name`` cannot be had: task families call this before anything else.

    Raises:
      DatasetNotPreparedError: a catalogue dataset is not prepared in ``data_dir``; the first
        line gives the ``scripts/prepare_data.py`` command for a paper dataset.
      FileNotFoundError: an ``idx:`` directory without IDX files, a missing ``text:`` file.
      tasks.errors.DatasetFileMissingError: a version directory with shards but no
        ``dataset_info.json``.
    """
    data_dir = _resolve(data_dir)
    if name in ("digits", GENERATED_TEXT):
        return
    if name.startswith(IDX_PREFIX):
        idx_lib.find_idx_splits(os.path.abspath(os.path.expanduser(name[len(IDX_PREFIX) :])))
    elif name.startswith(TEXT_PREFIX):
        path = os.path.abspath(os.path.expanduser(name[len(TEXT_PREFIX) :]))
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"text file {path} is a directory; give the path of one text file"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file {path} does not exist")
    else:
        _version_dir(name, data_dir)


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
    if os.path.isfile(os.path.join(data_dir, DIGITS_DATASET, "1.0.0", "dataset_info.json")):
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


# ----------------------------------------------------------------------------------------------
# Local files (IDX images, text corpora), converted once into array_record.


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
    if os.path.isdir(path):
        raise IsADirectoryError(f"text file {path} is a directory; give the path of one text file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist")
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
    if os.path.isdir(path):
        raise IsADirectoryError(f"text file {path} is a directory; give the path of one text file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist")

    def convert():
        return text_chunks(read_text_file(path)), None, f"text file {path}"

    return _convert_local("text", path, [path], convert, data_dir)


def generated_corpus(num_sentences: int = 3000, seed: int = 0) -> str:
    """A small English-like corpus from a fixed grammar: the embedded text dataset for tests.

    Sentences are ``Subject verb object[ modifier].`` drawn with ``seed``; the structure (word
    spellings, agreement, punctuation) is learnable by a tiny language model in a few hundred
    steps, well below the unigram entropy.
    """
    rng = np.random.default_rng(seed)
    subjects = ["the cat", "the dog", "a bird", "my friend", "the old man", "a child",
                "the teacher", "our neighbour", "the king", "a sailor"]  # fmt: skip
    verbs = ["sees", "likes", "finds", "watches", "follows", "calls", "helps", "paints"]
    objects = ["the ball", "a red apple", "the river", "a small house", "the moon", "her book",
               "the garden", "an open door", "the sea"]  # fmt: skip
    modifiers = ["", "", " today", " again", " at night", " in the rain", " with joy"]
    lines = []
    for _ in range(num_sentences):
        sentence = (
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
            f"{rng.choice(modifiers)}{rng.choice(['.', '.', '!', '?'])}"
        )
        lines.append(sentence[0].upper() + sentence[1:])
    return "\n".join(lines) + "\n"


def _prepare_generated_text(data_dir: str) -> None:
    if not _prepared(GENERATED_TEXT_DATASET, data_dir):
        write_arrays(
            GENERATED_TEXT_DATASET,
            text_chunks(generated_corpus().encode("utf-8")),
            data_dir,
            description="tasks.data.generated_corpus(): sentences from a fixed grammar, seed 0",
        )


# ----------------------------------------------------------------------------------------------
# Device-resident tokenised text.


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """A tokenised corpus held on the device: ``splits[split] = {"tokens": int32 [n]}``.

    ``tokenizer`` is ``"char"`` (ids index ``vocab``, the corpus' sorted characters) or
    ``"byte"`` (ids are UTF-8 bytes, ``vocab_size`` 256). Hashes by identity.
    """

    name: str
    tokenizer: str
    vocab_size: int
    vocab: tuple[str, ...] | None
    splits: dict[str, dict[str, jax.Array]]

    def size(self, split: str) -> int:
        """Number of tokens in ``split``."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {tuple(self.splits)}, got {split!r}")
        return int(self.splits[split]["tokens"].shape[0])

    def encode(self, text: str) -> np.ndarray:
        if self.vocab is None:
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the vocabulary of {self.name!r}")
        return np.asarray([index[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if self.vocab is None:
            return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
        return "".join(self.vocab[int(i)] for i in ids)


def load_text(
    name: str = GENERATED_TEXT,
    data_dir: str | None = None,
    *,
    tokenizer: str = "char",
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> TextDataset:
    """The text corpus ``name`` tokenised as a device-resident :class:`TextDataset` (cached).

    ``name``: ``"generated"`` (:func:`generated_corpus`, written on first use as
    ``lopt_generated_text``); ``"text:FILE"`` (a UTF-8 text file, gzipped or not, converted once
    into array_record in ``data_dir``); or a prepared catalogue dataset with a text feature
    (``"tiny_shakespeare"``: its ``text`` feature; several examples are joined by newlines).

    Splits are contiguous: a catalogue's ``train``/``validation``/``test`` are used as they are;
    a corpus with one split is cut into train, then the next ``valid_fraction`` and the last
    ``test_fraction`` of its tokens (Karpathy's char-rnn split at the defaults 0.05/0.05); a
    missing ``valid`` is the last ``valid_fraction`` of train. ``tokenizer="char"`` builds the
    vocabulary from all splits; ``"byte"`` reads UTF-8 bytes (any file, vocabulary 256).
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    for what, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{what} must be in (0, 1), got {fraction!r}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError("valid_fraction + test_fraction must be below 1")
    data_dir = _resolve(data_dir)
    source, content = _text_source(name, data_dir)
    fractions = float(valid_fraction), float(test_fraction)
    return _load_text(name, source, content, data_dir, tokenizer, *fractions)


def _text_source(name: str, data_dir: str) -> tuple[str, str | None]:
    """(the on-disk dataset behind ``name``, its content token) (see :func:`_image_source`)."""
    if name == GENERATED_TEXT:
        _prepare_generated_text(data_dir)
        return GENERATED_TEXT_DATASET, None
    if name.startswith(TEXT_PREFIX):
        return _local_text(name[len(TEXT_PREFIX) :], data_dir)
    if name == "digits" or name.startswith(IDX_PREFIX):
        raise ValueError(
            f"dataset {name!r} is an image dataset; text tasks need a corpus: 'generated', "
            "'text:FILE' or a catalogue name such as 'tiny_shakespeare'"
        )
    return name, None


@functools.lru_cache(maxsize=None)
def _load_text(
    name: str,
    source: str,
    content: str | None,  # only a cache key: the token of a local file's content
    data_dir: str,
    tokenizer: str,
    valid_fraction: float,
    test_fraction: float,
) -> TextDataset:
    sources, features, vdir = _open(source, data_dir)
    raw = {
        split: _split_text(src, features, name, f"{vdir} (split {split!r})")
        for split, src in sources.items()
    }

    if tokenizer == "byte":
        ids = {s: np.frombuffer(b, np.uint8).astype(np.int32) for s, b in raw.items()}
        vocab = None
        vocab_size = 256
    else:
        points = {s: _code_points(b, name, s) for s, b in raw.items()}
        table = np.unique(np.concatenate(list(points.values())))
        ids = {s: np.searchsorted(table, p).astype(np.int32) for s, p in points.items()}
        vocab = tuple(chr(int(c)) for c in table)
        vocab_size = len(vocab)

    if "train" not in ids and len(ids) == 1:
        ids = {"train": next(iter(ids.values()))}
    if "train" not in ids:
        raise ValueError(f"dataset {name!r} has no 'train' split; it has {sorted(ids)}")
    valid_name = next((s for s in ("validation", "valid") if s in ids), None)
    test_name = "test" if "test" in ids else valid_name
    train = ids["train"]
    if test_name is None:
        n = len(train)
        n_test, n_valid = max(1, round(test_fraction * n)), max(1, round(valid_fraction * n))
        if n_test + n_valid >= n:
            raise ValueError(f"dataset {name!r}: {n} tokens are too few to hold out valid and test")
        splits = {
            "train": train[: n - n_valid - n_test],
            "valid": train[n - n_valid - n_test : n - n_test],
            "test": train[n - n_test :],
        }
    else:
        splits = {"train": train, "test": ids[test_name]}
        if valid_name is not None and valid_name != test_name:
            splits["valid"] = ids[valid_name]
        else:
            n = len(train)
            n_valid = max(1, round(valid_fraction * n))
            if n_valid >= n:
                raise ValueError(
                    f"dataset {name!r}: {n} train tokens are too few to hold out valid"
                )
            splits["train"], splits["valid"] = train[: n - n_valid], train[n - n_valid :]
    with jax.ensure_compile_time_eval():
        device = {s: {"tokens": jax.device_put(splits[s])} for s in SPLITS}
    return TextDataset(
        name=name, tokenizer=tokenizer, vocab_size=vocab_size, vocab=vocab, splits=device
    )


def _split_text(source, features, name: str, where: str) -> bytes:
    """All of one split's text as UTF-8 bytes."""
    keys = list(features.keys())
    if {"bytes", "length"} <= set(keys):  # our chunked corpus format (text_chunks)
        a = _read_source(source, features, ("bytes", "length"), where)
        if (a["length"] < 0).any() or (a["length"] > a["bytes"].shape[1]).any():
            raise CorruptDatasetError(
                f"{where}: chunk lengths outside 0..{a['bytes'].shape[1]}; not a text corpus "
                "written by tasks.data.text_chunks"
            )
        return b"".join(row[:n].tobytes() for row, n in zip(a["bytes"], a["length"]))
    text_keys = ["text"] if "text" in keys else [
        k for k in keys if type(features[k]).__name__ == "Text"
    ]
    if len(text_keys) != 1:
        raise ValueError(
            f"dataset {name!r} has no (single) text feature to read: features {keys}"
        )
    texts = _read_source(source, features, text_keys, where)[text_keys[0]]
    return b"\n".join(t if isinstance(t, bytes) else str(t).encode("utf-8") for t in texts)


def _code_points(raw: bytes, name: str, split: str) -> np.ndarray:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFormatError(
            f"dataset {name!r} (split {split!r}) is not valid UTF-8 text: byte {e.start} "
            f"({e.reason}); use tokenizer='byte' to read it as raw bytes"
        ) from None
    return np.frombuffer(text.encode("utf-32-le"), np.dtype("<u4"))


def _cache_clear() -> None:
    for cached in (_load, _preprocessed, class_index, _load_text):
        cached.cache_clear()


load.cache_clear = _cache_clear  # type: ignore[attr-defined]
