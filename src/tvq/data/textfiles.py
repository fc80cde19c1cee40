"""Corpora made of local text: one text file, a folder of text files, or Python's own stdlib source.

All three are byte-level by default. A folder (and the stdlib) is split by file: the sha256 of
each file's relative path picks its split, so the assignment is deterministic, does not
depend on the other files, and never puts one file into two splits.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from tvq.data.corpus import SPLITS, Corpus, split_90_5_5, split_from_raw
from tvq.data.tokenizer import ByteTokenizer, Tokenizer

TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".text"})
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

# Upper ends of each split's bucket in [0, 1): ~90% train, 5% validation, 5% test.
_BUCKET_ENDS = {"train": 0.90, "validation": 0.95, "test": 1.0}


def _bucket(rel_path: str) -> float:
    """A uniform number in [0, 1) fixed by the relative path alone."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(rel_paths: Sequence[str]) -> dict[str, list[str]]:
    """Assign files (relative posix paths) to splits by hash, each split non-empty.

    A file goes to the first split whose bucket end exceeds its hash value. If that leaves a
    split empty (only likely with few files), the largest split gives it the file whose hash is
    nearest to the empty split's bucket. Within a split the input order is kept.
    """
    if len(set(rel_paths)) != len(rel_paths):
        raise ValueError("file paths passed to assign_splits must be unique")
    if len(rel_paths) < len(SPLITS):
        raise ValueError(
            f"splitting by file needs at least {len(SPLITS)} files, got {len(rel_paths)}; "
            "add files, use train/validation/test subfolders, or load a single text file"
        )
    value = {p: _bucket(p) for p in rel_paths}
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for p in rel_paths:
        splits[next(name for name in SPLITS if value[p] < _BUCKET_ENDS[name])].append(p)
    for target in SPLITS:
        if not splits[target]:
            donor = max(SPLITS, key=lambda name: len(splits[name]))  # has >= 2 files: n >= 3 files in <= 2 splits
            pick = max if SPLITS.index(target) > SPLITS.index(donor) else min
            moved = pick(splits[donor], key=value.__getitem__)
            splits[donor].remove(moved)
            splits[target].append(moved)
    order = {p: i for i, p in enumerate(rel_paths)}
    return {name: sorted(files, key=order.__getitem__) for name, files in splits.items()}


def _corpus_from_files(
    name: str, root: Path, files_per_split: dict[str, list[str]], tokenizer: Tokenizer | None
) -> Corpus:
    """Corpus with one document per file; files are read lazily, split by split."""
    tokenizer = tokenizer or ByteTokenizer()
    splits = {
        split: split_from_raw(((root / rel).read_bytes() for rel in files), tokenizer)
        for split, files in files_per_split.items()
    }
    return Corpus(name=name, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size, splits=splits)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Sorted relative posix paths of this interpreter's stdlib `.py` files, tests and site-packages excluded."""
    root = _stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py") and (Path(dirpath) / f).is_file())
    return sorted(found)


def load_stdlib(*, tokenizer: Tokenizer | None = None) -> Corpus:
    """The built-in corpus: this interpreter's standard-library Python source, one document per file.

    Files are the `.py` files under `sysconfig.get_paths()["stdlib"]`, skipping any folder named
    in STDLIB_EXCLUDED_DIRS, split by file with `assign_splits` (~90/5/5). About 12 MB for
    CPython 3.11; it loads in well under a second, so it is not cached.
    """
    files = stdlib_files()
    if len(files) < len(SPLITS):
        raise ValueError(f"found only {len(files)} stdlib .py files under {_stdlib_root()}; use another corpus source")
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    return _corpus_from_files(name, _stdlib_root(), assign_splits(files), tokenizer)


def load_text_file(path: str | Path, *, tokenizer: Tokenizer | None = None) -> Corpus:
    """One text file as one document, split by bytes: first 90% train, next 5% validation, last 5% test.

    The cuts are at byte offsets, so they may fall inside a word or a multi-byte character.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found; pass an existing file")
    raw = path.read_bytes()
    n_train, n_validation, n_test = split_90_5_5(len(raw))
    if min(n_train, n_validation, n_test) == 0:
        raise ValueError(f"text file {path} has {len(raw)} bytes; a 90/5/5 split needs at least 20")
    parts = {
        "train": raw[:n_train],
        "validation": raw[n_train : n_train + n_validation],
        "test": raw[n_train + n_validation :],
    }
    tokenizer = tokenizer or ByteTokenizer()
    splits = {name: split_from_raw([part], tokenizer) for name, part in parts.items()}
    return Corpus(name=path.name, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size, splits=splits)


def text_files(folder: Path) -> list[str]:
    """Relative posix paths of the text files under `folder`, recursively, sorted.

    Text files are regular files with a suffix in TEXT_SUFFIXES or no suffix; hidden files and
    folders (name starting with ".") and `__pycache__` are skipped.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        rel_dir = Path(dirpath).relative_to(folder)
        for f in filenames:
            if (
                not f.startswith(".")
                and Path(f).suffix.lower() in TEXT_SUFFIXES | {""}
                and (Path(dirpath) / f).is_file()
            ):
                found.append((rel_dir / f).as_posix())
    return sorted(found)


def load_text_folder(folder: str | Path, *, tokenizer: Tokenizer | None = None) -> Corpus:
    """The text files of a folder, one document per file.

    If the folder has a `train/` subfolder, the files of `train/`, `validation/` and `test/` are
    the splits (a missing `validation/` or `test/` is an empty split, an error only when used);
    otherwise all text files (see `text_files`) are split by file with `assign_splits` (~90/5/5).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"text folder {folder} not found; pass an existing folder")
    present = [name for name in SPLITS if (folder / name).is_dir()]
    if present:
        if "train" not in present:
            raise ValueError(f"folder {folder} has {', '.join(n + '/' for n in present)} but no train/; "
                             "add train/ or rename the split folders")
        files_per_split = {name: [f"{name}/{rel}" for rel in text_files(folder / name)] if name in present else []
                           for name in SPLITS}
        if not files_per_split["train"]:
            raise ValueError(
                f"no text files in {folder}/train; add files with suffix {sorted(TEXT_SUFFIXES)} or none"
            )
    else:
        files = text_files(folder)
        if not files:
            raise ValueError(f"no text files in {folder}; add files with suffix {sorted(TEXT_SUFFIXES)} or none")
        files_per_split = assign_splits(files)
    return _corpus_from_files(folder.resolve().name, folder, files_per_split, tokenizer)
