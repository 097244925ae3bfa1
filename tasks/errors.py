"""Errors for bad data inputs, raised before any training starts.

Every message's first line stands alone: it names the file (or dataset directory) and what is
wrong with it, so a log that keeps one line still says what to fix. Later lines, if any, give
details. The types let callers tell the cases apart:

* :class:`DatasetNotPreparedError` (a ``FileNotFoundError``): a catalogue dataset has no
  prepared array_record copy in the data dir; the message gives the command that prepares it.
* :class:`DataFileError` (a ``ValueError``): a data file is malformed, inconsistent or stale.
  Subclasses: ``tasks.idx.IdxFormatError`` (IDX files), :class:`TextFormatError` (text
  corpora), :class:`LabelRangeError` (labels outside ``[0, num_classes)``),
  :class:`CorruptDatasetError` (a prepared tfds directory tfds cannot read, or whose shards
  disagree with its ``dataset_info.json``), :class:`DatasetFileMissingError` (a file such a
  directory lists is missing; also a ``FileNotFoundError``) and :class:`StaleDataError` (a
  local file changed after it was converted and the copy cannot be rebuilt).
"""

from __future__ import annotations


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset has no array_record copy in the data dir (the data layer never downloads).

    ``dataset`` and ``data_dir`` say which dataset was looked for where; ``command`` is the
    ``scripts/prepare_data.py`` command line that prepares it, where the project knows one.
    """

    def __init__(
        self,
        message: str,
        *,
        dataset: str | None = None,
        data_dir: str | None = None,
        command: str | None = None,
    ):
        super().__init__(message)
        self.dataset, self.data_dir, self.command = dataset, data_dir, command


class DataFileError(ValueError):
    """A data file is malformed, inconsistent or stale (the message names the file)."""


class TextFormatError(DataFileError):
    """A text corpus is empty, a cut-short gzip stream, or not UTF-8 where UTF-8 is needed."""


class LabelRangeError(DataFileError):
    """Labels outside ``[0, num_classes)`` (or outside a 1-based file format's range)."""


class CorruptDatasetError(DataFileError):
    """A prepared tfds directory that tfds cannot read, or whose shards disagree with its
    ``dataset_info.json``."""


class DatasetFileMissingError(CorruptDatasetError, FileNotFoundError):
    """A file that a prepared tfds directory lists (a shard, ``dataset_info.json``) is missing."""


class StaleDataError(DataFileError):
    """A local file changed after it was converted, and the converted copy cannot be rebuilt."""


class StaleDataWarning(UserWarning):
    """A local file changed after it was converted; the converted copy is being rebuilt."""
