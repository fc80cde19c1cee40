"""Corpus: a tokenizer plus train/validation/test token arrays, as :mod:`tvq.data.sources` loads them.

Each split stores all of its documents' tokens concatenated into one 1-D array plus the
offset where each document starts, so training can sample windows and evaluation can
respect document boundaries. Per split it also keeps the raw text's UTF-8 byte count and
whitespace word count, the denominators of bits-per-byte and word-level perplexity.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from tvq.data.tokenizer import Tokenizer, token_dtype

SPLITS = ("train", "validation", "test")

# Bytes that `bytes.split()` treats as whitespace: space, \t, \n, \v, \f, \r.
_ASCII_WHITESPACE = np.zeros(256, dtype=bool)
_ASCII_WHITESPACE[list(b" \t\n\x0b\x0c\r")] = True


def count_words(raw: bytes) -> int:
    """Number of whitespace-separated words in raw bytes; equals `len(raw.split())`, without the list."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size == 0:
        return 0
    space = _ASCII_WHITESPACE[data]
    word_start = ~space
    word_start[1:] &= space[:-1]
    return int(np.count_nonzero(word_start))


def split_90_5_5(n: int) -> tuple[int, int, int]:
    """Sizes (train, validation, test) of a contiguous 90% / 5% / 5% split of n items."""
    n_train, n_validation = n * 90 // 100, n * 5 // 100
    return n_train, n_validation, n - n_train - n_validation


@dataclass(frozen=True)
class Split:
    """One split: every document's tokens concatenated, and where each document starts."""

    tokens: np.ndarray  # (n_tokens,) token_dtype(vocab_size)
    doc_starts: np.ndarray  # (n_docs,) int64, strictly increasing, doc_starts[0] == 0 when non-empty
    n_bytes: int  # UTF-8 bytes of the raw text: bits-per-byte = total nats / ln 2 / n_bytes
    n_words: int  # whitespace-separated words of the raw text, for word-level perplexity

    def __post_init__(self):
        if self.tokens.ndim != 1 or self.doc_starts.ndim != 1 or self.doc_starts.dtype != np.int64:
            raise ValueError(
                f"a Split needs 1-D tokens and 1-D int64 doc_starts, got shapes {self.tokens.shape} and "
                f"{self.doc_starts.shape}, doc_starts dtype {self.doc_starts.dtype}; build it with split_from_documents"
            )
        starts, n_tokens = self.doc_starts, len(self.tokens)
        if n_tokens == 0:
            valid = len(starts) == 0
        else:
            valid = len(starts) > 0 and starts[0] == 0 and starts[-1] < n_tokens and bool(np.all(np.diff(starts) > 0))
        if not valid:
            raise ValueError(
                "doc_starts must start at 0, increase strictly and stay below len(tokens) (no empty documents); "
                "build the Split with split_from_documents"
            )

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (a view)."""
        if not -self.n_docs <= i < self.n_docs:
            raise ValueError(f"document index {i} out of range for a split of {self.n_docs} documents")
        i %= self.n_docs
        end = self.doc_starts[i + 1] if i + 1 < self.n_docs else len(self.tokens)
        return self.tokens[self.doc_starts[i] : end]


def split_from_documents(documents: Sequence[np.ndarray], dtype: np.dtype, *, n_bytes: int, n_words: int) -> Split:
    """Concatenate per-document token arrays into one Split, dropping empty documents."""
    documents = [doc for doc in documents if len(doc)]
    if not documents:
        return Split(np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64), n_bytes=n_bytes, n_words=n_words)
    lengths = np.array([len(doc) for doc in documents], dtype=np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
    return Split(np.concatenate(documents).astype(dtype, copy=False), doc_starts, n_bytes=n_bytes, n_words=n_words)


def split_from_raw(raw_documents: Iterable[bytes], tokenizer: Tokenizer, *, chunk_size: int = 64) -> Split:
    """Tokenize raw UTF-8 documents into one Split; bytes and words are counted on the raw text.

    Documents are consumed `chunk_size` at a time, so a lazy iterable (e.g. files read on
    demand) never holds more than one chunk of raw text in memory.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    pieces: list[np.ndarray] = []
    n_bytes = n_words = 0
    documents = iter(raw_documents)
    while chunk := list(islice(documents, chunk_size)):
        n_bytes += sum(len(doc) for doc in chunk)
        n_words += sum(count_words(doc) for doc in chunk)
        pieces.extend(tokenizer.encode_documents(chunk))
    return split_from_documents(pieces, dtype, n_bytes=n_bytes, n_words=n_words)


@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: the tokenizer and one `Split` per name in SPLITS (possibly empty)."""

    name: str
    tokenizer: Tokenizer
    vocab_size: int
    splits: Mapping[str, Split]

    def __post_init__(self):
        if set(self.splits) != set(SPLITS):
            raise ValueError(f"a Corpus needs exactly the splits {SPLITS}, got {tuple(self.splits)}")
        if self.vocab_size != self.tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size {self.vocab_size} differs from the tokenizer's {self.tokenizer.vocab_size}; "
                "pass tokenizer.vocab_size"
            )
        dtype = token_dtype(self.vocab_size)
        for name, split in self.splits.items():
            if split.tokens.dtype != dtype:
                raise ValueError(
                    f"split {name!r} has tokens of dtype {split.tokens.dtype}, expected {dtype} for vocab "
                    f"{self.vocab_size}"
                )

    def split(self, name: str) -> Split:
        """The split `name` ("train", "validation" or "test"); raises ValueError if unknown or empty."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        split = self.splits[name]
        if split.n_docs == 0:
            raise ValueError(
                f"split {name!r} of corpus {self.name!r} is empty; give the source data for it or use another split"
            )
        return split
