"""Tokenizers: text <-> token ids.

`ByteTokenizer` (UTF-8 bytes, vocab 256) is the default for every byte-level corpus.
`SentencePieceTokenizer` wraps a trained SentencePiece `.model` file (PG-19 uses a 32k one);
`train_sentencepiece` trains such a model. `sentencepiece` is an optional dependency, imported
only when a SentencePiece model is loaded or trained.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

# SentencePiece's control pieces <unk>, <s>, </s> plus the 256 byte-fallback pieces.
_SPM_RESERVED_PIECES = 3 + 256

DOC_START = 0  # the input token that stands before the first token of every document, of any tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype that holds every id in [0, vocab_size): uint8, uint16 or int32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**31:
        return np.dtype(np.int32)
    raise ValueError(f"vocab_size {vocab_size} does not fit int32 token ids; use a smaller vocabulary")


def _ids_array(ids: Iterable[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids as a 1-D int64 array, checked to lie in [0, vocab_size)."""
    arr = np.asarray(list(ids) if isinstance(ids, Iterator) else ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be a 1-D sequence of integers, got shape {arr.shape} dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]; "
            "decode with the tokenizer that made them"
        )
    return arr.astype(np.int64, copy=False)


class Tokenizer(ABC):
    """Maps text to ids in [0, vocab_size) and back.

    `name` identifies the token mapping itself (it changes whenever the mapping does), so
    it can key caches of tokenized corpora.
    """

    name: str
    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""

    @abstractmethod
    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of token ids; raises ValueError for ids outside [0, vocab_size)."""

    def encode_documents(self, documents: Sequence[bytes]) -> list[np.ndarray]:
        """Token arrays (dtype `token_dtype(vocab_size)`) of raw UTF-8 documents.

        Invalid UTF-8 is decoded as U+FFFD; subclasses may override to batch or to keep bytes exact.
        """
        dtype = token_dtype(self.vocab_size)
        return [np.asarray(self.encode(doc.decode("utf-8", errors="replace")), dtype=dtype) for doc in documents]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: vocab 256, lossless on any byte string."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of byte ids; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return _ids_array(ids, self.vocab_size).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_documents(self, documents: Sequence[bytes]) -> list[np.ndarray]:
        """The raw bytes themselves (uint8), so even invalid UTF-8 is kept exactly."""
        return [np.frombuffer(doc, dtype=np.uint8) for doc in documents]

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_sentencepiece():
    """The `sentencepiece` module, or an ImportError saying how to install it."""
    try:
        import sentencepiece
    except ImportError as err:
        raise ImportError(
            "SentencePiece tokenizers need the optional package sentencepiece; run `pip install tvq[sentencepiece]`"
        ) from err
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model loaded from a `.model` file."""

    def __init__(self, model_file: str | Path):
        path = Path(model_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"SentencePiece model {path} not found; "
                "train one with train_sentencepiece or pass an existing .model file"
            )
        spm = _import_sentencepiece()
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError, ValueError) as err:  # SentencePiece's errors on a damaged file
            reason = " ".join(str(err).split())[:160]
            raise ValueError(f"{path} is not a valid SentencePiece model ({reason}); "
                             "use the .model file the vocabulary was trained into") from None
        self.vocab_size = self._sp.get_piece_size()
        digest = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()
        self.name = f"sentencepiece:{path.stem}:{digest[:12]}"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._sp.decode(_ids_array(ids, self.vocab_size).tolist())

    def encode_documents(self, documents: Sequence[bytes]) -> list[np.ndarray]:
        """Token arrays of raw UTF-8 documents, encoded on all CPU cores."""
        texts = [doc.decode("utf-8", errors="replace") for doc in documents]
        dtype = token_dtype(self.vocab_size)
        encoded = self._sp.encode(texts, out_type=int, num_threads=os.cpu_count() or 1)
        return [np.asarray(ids, dtype=dtype) for ids in encoded]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r})"


def train_sentencepiece(
    text_files: Sequence[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    max_sentences: int = 1_000_000,
    character_coverage: float = 0.9995,
    num_threads: int = 8,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train a SentencePiece model on the lines of `text_files`; writes `{model_prefix}.model` (and `.vocab`).

    Lossless by construction: byte fallback on (no <unk> for any text), identity normalization,
    whitespace kept as is and no dummy prefix, so `decode(encode(text)) == text`.
    Training reads at most `max_sentences` lines, sampled with a fixed `seed`; the result is
    deterministic for fixed inputs, `seed` and `num_threads` (the model depends on the thread count).
    """
    files = [Path(f).expanduser() for f in text_files]
    if not files:
        raise ValueError("train_sentencepiece needs at least one text file; pass a non-empty list of paths")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"training text {f} not found; pass existing text files")
        if "," in str(f):
            raise ValueError(f"SentencePiece cannot read a path containing a comma: {f}; rename or move the file")
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if vocab_size <= _SPM_RESERVED_PIECES:
        raise ValueError(
            f"vocab_size must exceed {_SPM_RESERVED_PIECES} (3 control + 256 byte pieces), got {vocab_size}"
        )
    if max_sentences < 1 or num_threads < 1:
        raise ValueError(f"max_sentences and num_threads must be positive, got {max_sentences} and {num_threads}")
    spm = _import_sentencepiece()
    prefix = Path(model_prefix).expanduser()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=[str(f) for f in files],
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=1,
        )
    except RuntimeError as err:  # SentencePiece reports bad settings for the data (e.g. a too small vocab) this way
        raise ValueError(f"SentencePiece training failed: {err}") from err
    return SentencePieceTokenizer(prefix.with_name(prefix.name + ".model"))
