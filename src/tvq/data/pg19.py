"""PG-19: Project Gutenberg books published before 1919 (Rae et al., 2020), one document per book.

Expects the official layout, `DIR/train/`, `DIR/validation/` and `DIR/test/` folders of `.txt`
books. Tokens come from a SentencePiece model (32k pieces in the literature): the caller's, or
`DIR/spm32k.model` written by `train_pg19_vocab` (the `tvq data train-vocab pg19:DIR` command).
Tokenizing all of PG-19 is slow, so the token arrays are cached (see `tvq.data.cache`).
"""

from __future__ import annotations

from pathlib import Path

from tvq.data.cache import cached_splits, fingerprint, resolve_cache_dir
from tvq.data.corpus import SPLITS, Corpus, split_from_raw
from tvq.data.tokenizer import SentencePieceTokenizer, Tokenizer, train_sentencepiece

PG19_VOCAB_FILE = "spm32k.model"


def pg19_books(directory: str | Path) -> dict[str, list[Path]]:
    """The `.txt` books of each split folder of a PG-19 directory, sorted by name."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"PG-19 folder {directory} not found; pass pg19:DIR with DIR holding train/, validation/ and test/"
        )
    missing = [name for name in SPLITS if not (directory / name).is_dir()]
    if missing:
        raise ValueError(
            f"PG-19 folder {directory} lacks {', '.join(m + '/' for m in missing)}; "
            "use the official layout with train/, validation/ and test/ folders of .txt books"
        )
    books = {name: sorted((directory / name).glob("*.txt")) for name in SPLITS}
    if not any(books.values()):
        raise ValueError(
            f"PG-19 folder {directory} has no .txt books in train/, validation/ or test/; download the books into them"
        )
    return books


def train_pg19_vocab(
    directory: str | Path,
    vocab_size: int = 32000,
    *,
    output: str | Path | None = None,
    model_type: str = "unigram",
    max_sentences: int = 1_000_000,
    num_threads: int = 8,
    seed: int = 0,
) -> Path:
    """Train SentencePiece on the PG-19 training books; writes and returns `output` (default `DIR/spm32k.model`).

    The default output is the file `load_corpus("pg19:DIR")` picks up. See `train_sentencepiece`
    for the (lossless, deterministic) settings; `max_sentences` lines are sampled from all books.
    """
    books = pg19_books(directory)["train"]
    if not books:
        raise ValueError(f"PG-19 folder {directory} has no training books in train/; the vocabulary is trained on them")
    output = Path(directory).expanduser() / PG19_VOCAB_FILE if output is None else Path(output).expanduser()
    if output.suffix != ".model":
        raise ValueError(f"output must be a .model file path, got {output}")
    tokenizer = train_sentencepiece(
        books,
        output.with_suffix(""),
        vocab_size,
        model_type=model_type,
        max_sentences=max_sentences,
        num_threads=num_threads,
        seed=seed,
    )
    return tokenizer.path


def load_pg19(
    directory: str | Path, *, cache_dir: str | Path | None = None, tokenizer: Tokenizer | None = None
) -> Corpus:
    """PG-19 with its official splits, one document per book; bytes and words are counted on the raw text.

    `tokenizer` defaults to `DIR/spm32k.model`. Token arrays are cached under `cache_dir`
    (default `~/.cache/tvq`), keyed by the books and the tokenizer.
    """
    books = pg19_books(directory)
    if tokenizer is None:
        model = Path(directory).expanduser() / PG19_VOCAB_FILE
        if not model.is_file():
            raise ValueError(
                f"no tokenizer for PG-19: {model} does not exist; "
                f"run `tvq data train-vocab pg19:{directory}` or pass tokenizer="
            )
        tokenizer = SentencePieceTokenizer(model)
    all_books = [book for name in SPLITS for book in books[name]]
    key = fingerprint({"source": "pg19", "tokenizer": tokenizer.name}, all_books)

    def build():
        return {name: split_from_raw((book.read_bytes() for book in books[name]), tokenizer) for name in SPLITS}

    splits = cached_splits(resolve_cache_dir(cache_dir) / f"pg19-{key}", build)
    return Corpus(name="pg19", tokenizer=tokenizer, vocab_size=tokenizer.vocab_size, splits=splits)
