"""Where prepared datasets live, decided from the filesystem alone.

The data dir (:func:`default_data_dir`), the names of the datasets this package makes itself
(``digits``, ``generated``, ``idx:DIR``, ``text:FILE``), the newest prepared version directory
of a dataset (``_version_dir``) and :func:`require`, which task families call before any other
work. Nothing here parses a data file or imports tfds, so a dataset that is not prepared fails
at once, with the command that prepares it, instead of tfds trying the network.
"""

from __future__ import annotations

import os
import re

from tasks import catalogue
from tasks import idx as idx_lib
from tasks.errors import DatasetFileMissingError, DatasetNotPreparedError

GENERATED_TEXT = "generated"  # load_text's embedded default (text.GENERATED_TEXT_DATASET on disk)
IDX_PREFIX, TEXT_PREFIX = "idx:", "text:"
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
        _check_text_file(os.path.abspath(os.path.expanduser(name[len(TEXT_PREFIX) :])))
    else:
        _version_dir(name, data_dir)


def _check_text_file(path: str) -> None:
    """Raise unless ``path`` is an existing file (the ``text:`` corpus a dataset name gives)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"text file {path} is a directory; give the path of one text file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist")
