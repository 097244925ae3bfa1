"""Datasets for inner problems: tensorflow-datasets without TensorFlow (DESIGN.md, "datasets").

Every dataset, whether a tfds catalogue dataset or one of our own, is read the same way: from a
tfds directory ``DATA_DIR/NAME[/CONFIG]/VERSION/`` holding ``dataset_info.json`` and
``*.array_record*`` shards, through tfds' random-access data source (``ArrayRecordDataSource``).
That reader is pure numpy; TensorFlow is never imported. The package, by concern:

* ``locate``: the data dir (``$LOPT_DATA_DIR``, else ``$TFDS_DATA_DIR``, else
  ``~/.cache/lopt/tensorflow_datasets``; :func:`default_data_dir`) and whether a dataset is
  prepared there, decided on the filesystem before tfds is asked anything, so a missing one
  raises :class:`DatasetNotPreparedError` at once with the command that prepares it
  (:func:`require`). This layer never downloads. The paper datasets (MNIST, CIFAR-10, ImageNet
  32x32, Tiny Shakespeare; ``tasks.catalogue``) are prepared from raw files a user downloaded
  with ``python scripts/prepare_data.py`` (``tasks.prepare``); other catalogue datasets with
  ``tfds build`` / ``tfds convert_format``, which need TensorFlow, elsewhere.
* ``store``: :func:`write_arrays` turns numpy arrays into such a directory through a
  ``tfds.core.GeneratorBasedBuilder`` (Tensor features, raw-bytes encoding, so dtypes and values
  round-trip exactly); :func:`read_arrays` reads any prepared dataset back into numpy.
* ``local``: a dataset name ``"idx:DIR"`` names a directory of MNIST-format IDX files
  (``train-images-idx3-ubyte.gz`` ...), ``"text:FILE"`` a plain (or gzipped) text corpus. On
  first use they are parsed (``tasks.idx``) and written with :func:`write_arrays` into the data
  dir, under a name derived from their path, with a record of each file's size, modification
  time and sha256; every later read goes through the array_record copy like any other dataset.
  A file that changed since (by its sha256, recomputed when its size or times change) is
  reconverted, with a :class:`StaleDataWarning` that says so; the copy never serves stale data.
* ``images``: :func:`load` returns a :class:`Dataset` of device-resident image/label splits
  ``train``/``valid``/``test``, the form task families sample batches from inside jit.
  ``load("digits")`` is the embedded default (scikit-learn's 8x8 digits, written on first use
  as the dataset ``lopt_digits``); any other name is ``idx:DIR`` or a catalogue dataset
  prepared beforehand. It also preprocesses images (``resize``, ``channels``, ``scale``,
  ``classes``; see ``tasks.preprocess``), cached per option set.
* ``text``: :func:`load_text` returns a :class:`TextDataset` of character- or byte-tokenised
  splits: ``"generated"`` (a small corpus generated from a fixed grammar, the embedded default
  for tests), ``"text:FILE"``, or a catalogue text dataset such as ``"tiny_shakespeare"``.

Bad inputs fail before any training starts, with a first line that names the file and the
fault (``tasks.errors``): malformed IDX or text files, labels outside ``[0, num_classes)``,
a prepared directory whose ``dataset_info.json`` is unreadable or whose shards are missing or
disagree with it.

Every public name is importable from ``tasks.data``; code inside the package imports from the
submodule that defines it.
"""

from tasks.base import SPLITS
from tasks.data import images, text
from tasks.data.images import (
    DIGITS_DATASET,
    DIGITS_TEST_FRACTION,
    Dataset,
    check_labels,
    class_index,
    load,
)
from tasks.data.local import (
    SOURCE_RECORD,
    read_idx_dir,
    read_text_file,
    source_fingerprint,
    text_chunks,
    write_source_record,
)
from tasks.data.locate import (
    GENERATED_TEXT,
    IDX_PREFIX,
    TEXT_PREFIX,
    default_data_dir,
    require,
    with_smoke_hint,
)
from tasks.data.store import read_arrays, write_arrays
from tasks.data.text import (
    GENERATED_TEXT_DATASET,
    TOKENIZERS,
    TextDataset,
    generated_corpus,
    load_text,
)
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


def _cache_clear() -> None:
    for cached in (images._load, images._preprocessed, class_index, text._load_text):
        cached.cache_clear()


load.cache_clear = _cache_clear  # type: ignore[attr-defined]

__all__ = [
    "DIGITS_DATASET",
    "DIGITS_TEST_FRACTION",
    "GENERATED_TEXT",
    "GENERATED_TEXT_DATASET",
    "IDX_PREFIX",
    "SOURCE_RECORD",
    "SPLITS",
    "TEXT_PREFIX",
    "TOKENIZERS",
    "CorruptDatasetError",
    "DataFileError",
    "Dataset",
    "DatasetFileMissingError",
    "DatasetNotPreparedError",
    "LabelRangeError",
    "StaleDataError",
    "StaleDataWarning",
    "TextDataset",
    "TextFormatError",
    "check_labels",
    "class_index",
    "default_data_dir",
    "generated_corpus",
    "load",
    "load_text",
    "read_arrays",
    "read_idx_dir",
    "read_text_file",
    "require",
    "source_fingerprint",
    "text_chunks",
    "with_smoke_hint",
    "write_arrays",
    "write_source_record",
]
