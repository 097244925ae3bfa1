"""Text corpora: the generated default, local files (plain and gzipped), catalogue-style text
datasets, character and byte tokenisation, contiguous splits, and every bad input's message."""

from __future__ import annotations

import gzip
import os
import sys
import time

import jax
import numpy as np
import pytest

import tasks
from tasks import data, errors
from tasks.data import local as data_local

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak. Ünïcödé ✓\n" * 40


def _joined(ds) -> str:
    return "".join(ds.decode(ds.splits[s]["tokens"]) for s in ("train", "valid", "test"))


def test_generated_corpus_is_the_default():
    ds = data.load_text()
    assert ds.name == "generated" and ds.tokenizer == "char"
    assert _joined(ds) == data.generated_corpus()
    assert ds.vocab == tuple(sorted(set(data.generated_corpus())))
    assert ds.vocab_size == len(ds.vocab) < 40
    n = len(data.generated_corpus())
    assert (ds.size("valid"), ds.size("test")) == (round(0.05 * n), round(0.05 * n))
    for split in ds.splits.values():
        assert split["tokens"].dtype == np.int32
    assert data.load_text() is ds  # cached
    assert data.generated_corpus() == data.generated_corpus()  # deterministic


@pytest.mark.parametrize("gz", [False, True])
def test_local_text_file_char_and_byte(tmp_path, gz):
    path = tmp_path / ("corpus.txt.gz" if gz else "corpus.txt")
    raw = TEXT.encode("utf-8")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    data_dir = str(tmp_path / "tfds")
    chars = data.load_text(f"text:{path}", data_dir, valid_fraction=0.1, test_fraction=0.2)
    assert chars.vocab == tuple(sorted(set(TEXT)))
    assert _joined(chars) == TEXT
    n = len(TEXT)
    assert (chars.size("valid"), chars.size("test")) == (round(0.1 * n), round(0.2 * n))
    # The test split is the end of the corpus, valid just before it.
    assert chars.decode(chars.splits["test"]["tokens"]) == TEXT[-round(0.2 * n) :]
    np.testing.assert_array_equal(chars.encode("hear me"), [chars.vocab.index(c) for c in "hear me"])
    byte = data.load_text(f"text:{path}", data_dir, tokenizer="byte")
    assert byte.vocab is None and byte.vocab_size == 256
    assert sum(byte.size(s) for s in byte.splits) == len(raw)
    assert _joined(byte) == TEXT
    converted = [d for d in os.listdir(data_dir) if not d.startswith(".")]
    assert len(converted) == 1 and converted[0].startswith("text_corpus_txt")


def test_local_text_is_converted_once(tmp_path, monkeypatch):
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT)
    first = data.load_text(f"text:{path}", str(tmp_path))
    data.load.cache_clear()  # empties every dataset cache
    # Patched where _local_text looks it up (tasks.data.local), not on the package.
    monkeypatch.setattr(data_local, "read_text_file", lambda p: pytest.fail("read the file again"))
    again = data.load_text(f"text:{path}", str(tmp_path))
    assert again is not first and _joined(again) == TEXT
    # A changed file is converted again, and says so.
    monkeypatch.undo()
    path.write_text(TEXT + "more\n")
    with pytest.warns(errors.StaleDataWarning, match=f"{path} changed since it was converted"):
        assert _joined(data.load_text(f"text:{path}", str(tmp_path))) == TEXT + "more\n"


def test_text_changed_in_place_is_not_served_from_the_cache(tmp_path):
    """Same size, same mtime, same process: the in-memory cache is keyed on content too."""
    path = tmp_path / "same_size.txt"
    path.write_text("abcd" * 100)
    first = data.load_text(f"text:{path}", str(tmp_path / "tfds"))
    st = os.stat(path)
    path.write_text("dcba" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(errors.StaleDataWarning):
        second = data.load_text(f"text:{path}", str(tmp_path / "tfds"))
    assert _joined(first).startswith("abcd") and _joined(second).startswith("dcba")


def test_bad_text_inputs(tmp_path):
    d = str(tmp_path / "tfds")
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=f"text file {missing} does not exist"):
        data.load_text(f"text:{missing}", d)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        data.load_text(f"text:{tmp_path}", d)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(errors.TextFormatError, match=f"text file {empty} is empty"):
        data.load_text(f"text:{empty}", d)
    cut = tmp_path / "cut.txt.gz"
    compressed = gzip.compress(TEXT.encode())
    cut.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(errors.TextFormatError, match=f"^{cut}: truncated or corrupt gzip"):
        data.load_text(f"text:{cut}", d)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    with pytest.raises(
        errors.TextFormatError, match=r"not valid UTF-8 text: byte 3 .*tokenizer='byte'"
    ) as info:
        data.load_text(f"text:{latin}", d)
    assert str(latin) in str(info.value)
    assert data.load_text(f"text:{latin}", d, tokenizer="byte").vocab_size == 256
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab")
    with pytest.raises(ValueError, match="too few"):
        data.load_text(f"text:{tiny}", d)
    with pytest.raises(ValueError, match="tokenizer"):
        data.load_text(tokenizer="word")
    with pytest.raises(ValueError, match="valid_fraction"):
        data.load_text(valid_fraction=0.0)
    with pytest.raises(ValueError, match="below 1"):
        data.load_text(valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="image dataset"):
        data.load_text("digits")
    with pytest.raises(ValueError, match="text corpus"):
        data.load(f"text:{tiny}")


def test_unprepared_catalogue_text_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as info:
        data.load_text("tiny_shakespeare", str(tmp_path))
    assert time.monotonic() - start < 10
    assert "tfds build tiny_shakespeare" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_catalogue_text_layout(tmp_path):
    """A dataset as `tfds build tiny_shakespeare --file_format=array_record` leaves it: one
    `text` example per split, splits train/validation/test."""
    import tensorflow_datasets as tfds

    parts = {"train": "To be, or not to be:\n" * 20, "validation": "that is the question\n" * 3,
             "test": "Whether 'tis nobler\n" * 3}  # fmt: skip

    class TinyShakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "tiny_shakespeare"
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(t) for s, t in parts.items()}

        def _generate_examples(self, text):
            yield 0, {"text": text}

    TinyShakespeare(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_dir=str(tmp_path / "downloads")
    )
    ds = data.load_text("tiny_shakespeare", str(tmp_path))
    assert ds.decode(ds.splits["train"]["tokens"]) == parts["train"]
    assert ds.decode(ds.splits["valid"]["tokens"]) == parts["validation"]
    assert ds.decode(ds.splits["test"]["tokens"]) == parts["test"]
    assert ds.vocab == tuple(sorted(set("".join(parts.values()))))
    assert "tensorflow" not in sys.modules


def test_gpt2_mini_on_a_local_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    family = tasks.get(
        "gpt2_mini", dataset=f"text:{path}", data_dir=str(tmp_path), tokenizer="byte",
        num_layers=1, width=8, num_heads=2, context=12, batch_size=3,
    )  # fmt: skip
    assert family.vocab_size == 256
    batch = family.batch(family.sample(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), "valid")
    assert batch["tokens"].shape == (3, 13)
    assert family.param_count() == family.param_count(vocab_size=256)
