"""Data sources by name: stdlib, a text file, a folder of text files, enwik8, pg19:DIR and
imagenet64:DIR. Load one as a corpus, describe its splits, or train a vocabulary on it."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from tvq.data.corpus import Corpus
from tvq.data.enwik8 import load_enwik8
from tvq.data.imagenet64 import load_imagenet64
from tvq.data.pg19 import PG19_VOCAB_FILE, load_pg19, train_pg19_vocab
from tvq.data.textfiles import load_stdlib, load_text_file, load_text_folder
from tvq.data.tokenizer import Tokenizer, train_sentencepiece
from tvq.usage import UsageError, check_writable_file

SOURCE_FORMS = "stdlib, a text file, a folder of text files, enwik8, pg19:DIR, imagenet64:DIR"


def load_corpus(
    source: str | os.PathLike, *, cache_dir: str | Path | None = None, tokenizer: Tokenizer | None = None
) -> Corpus:
    """Load a corpus by source: "stdlib", a text file, a folder of text files, "enwik8", "pg19:DIR" or "imagenet64:DIR".

    `cache_dir` holds downloads (enwik8) and tokenized arrays of large corpora (pg19,
    imagenet64); None means `~/.cache/tvq`. `tokenizer` replaces a text corpus's default
    (bytes; for pg19, `DIR/spm32k.model`). See each loader for the split rules.
    """
    source = os.fspath(source)
    if source == "stdlib":
        return load_stdlib(tokenizer=tokenizer)
    if source == "enwik8":
        return load_enwik8(cache_dir=cache_dir, tokenizer=tokenizer)
    kind, colon, directory = source.partition(":")
    if colon and kind in ("pg19", "imagenet64"):
        if not directory:
            raise ValueError(f"corpus source {source!r} names no folder; write it as {kind}:DIR")
        if kind == "pg19":
            return load_pg19(directory, cache_dir=cache_dir, tokenizer=tokenizer)
        if tokenizer is not None:
            raise ValueError("imagenet64 tokens are pixel bytes; call load_corpus without tokenizer=")
        return load_imagenet64(directory, cache_dir=cache_dir)
    path = Path(source).expanduser()
    if path.is_file():
        return load_text_file(path, tokenizer=tokenizer)
    if path.is_dir():
        return load_text_folder(path, tokenizer=tokenizer)
    raise FileNotFoundError(
        f"corpus source {source!r} is neither a known name nor an existing file or folder; use one of: {SOURCE_FORMS}"
    )


def source_info(source: str) -> list[str]:
    """One line per split of a source: its tokens, documents and bytes (``tvq data info``)."""
    corpus = load_corpus(source)
    return [f"{name}: {len(split.tokens):,} tokens, {split.n_docs:,} documents, {split.n_bytes:,} bytes"
            for name, split in corpus.splits.items()]


def train_vocab(source: str, vocab_size: int = 32000, out: str | None = None) -> Path:
    """Train a SentencePiece vocabulary on a text source's training split (``tvq data train-vocab``);
    returns the ``.model`` file written: ``out``, else ``DIR/spm32k.model`` for ``pg19:DIR`` (where
    PG-19 looks for it), else ``spm-VOCAB_SIZE.model``. Every problem is refused before training."""
    if importlib.util.find_spec("sentencepiece") is None:
        raise UsageError("tvq data train-vocab needs sentencepiece: pip install 'tvq[sentencepiece]'")
    if source.startswith("imagenet64:"):
        raise UsageError("train-vocab needs a text source; images are always 256 intensity tokens")
    pg19 = source.startswith("pg19:")
    path = Path(out) if out else (Path(source[5:]) / PG19_VOCAB_FILE if pg19 else Path(f"spm-{vocab_size}.model"))
    if path.suffix != ".model":
        raise UsageError(f"--out must end in .model, got {path}")
    check_writable_file(path, "--out")
    if pg19:
        return train_pg19_vocab(source.split(":", 1)[1], vocab_size=vocab_size, output=out)
    train = load_corpus(source).split("train")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "train.txt"
        text.write_bytes(train.tokens.tobytes())
        train_sentencepiece([text], path.with_suffix(""), vocab_size)
    return path
