"""Device-resident tokenised text: :func:`load_text` and the embedded ``generated`` corpus.

``load_text`` reads a corpus (``generated``, a small grammar-generated one written on first
use; ``text:FILE``, converted by ``tasks.data.local``; or a catalogue dataset with a text
feature such as ``tiny_shakespeare``), tokenises it by character or byte and puts contiguous
train/valid/test token streams on the device, cached like ``tasks.data.images.load``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from tasks.base import SPLITS
from tasks.data.local import _local_text, _prepared, text_chunks
from tasks.data.locate import GENERATED_TEXT, IDX_PREFIX, TEXT_PREFIX, _resolve
from tasks.data.store import _open, _read_source, write_arrays
from tasks.errors import CorruptDatasetError, TextFormatError

GENERATED_TEXT_DATASET = "lopt_generated_text"  # on-disk name of load_text's embedded default
TOKENIZERS = ("char", "byte")


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
