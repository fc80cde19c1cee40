"""On-disk cache of tokenized splits, for corpora that are slow to tokenize or convert (pg19, imagenet64).

An entry is a folder named by a fingerprint of the source files (path, size, mtime) and the
settings that shape the tokens; it holds `{split}.tokens.npy`, `{split}.doc_starts.npy` and
`meta.json` (byte and word counts). Entries are written to a temporary folder and renamed
into place, so a crash never leaves a half-written entry. Loaded arrays are memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from tvq.data.corpus import SPLITS, Split

_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/tvq`, or `~/.cache/tvq`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tvq"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """`cache_dir` as a Path, or the default when None."""
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def fingerprint(settings: Mapping[str, object], files: Iterable[Path]) -> str:
    """Hex key that changes when the settings or any file's path, size or mtime change."""
    h = hashlib.sha256(json.dumps({"format": _FORMAT_VERSION, **settings}, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.absolute()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_splits(entry: Path, build: Callable[[], Mapping[str, Split]]) -> dict[str, Split]:
    """The splits stored in cache folder `entry`, calling `build` and storing its result first if absent."""
    if not (entry / "meta.json").is_file():
        _save(entry, build())
    meta = json.loads((entry / "meta.json").read_text())
    return {
        name: Split(
            np.load(entry / f"{name}.tokens.npy", mmap_mode="r"),
            np.load(entry / f"{name}.doc_starts.npy"),
            n_bytes=meta["n_bytes"][name],
            n_words=meta["n_words"][name],
        )
        for name in SPLITS
    }


def _save(entry: Path, splits: Mapping[str, Split]) -> None:
    """Write `splits` to a temporary folder beside `entry`, then rename it to `entry`."""
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SPLITS:
        np.save(tmp / f"{name}.tokens.npy", splits[name].tokens)
        np.save(tmp / f"{name}.doc_starts.npy", splits[name].doc_starts)
    meta = {"n_bytes": {n: splits[n].n_bytes for n in SPLITS}, "n_words": {n: splits[n].n_words for n in SPLITS}}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, entry)
    except OSError:  # another process stored the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (entry / "meta.json").is_file():
            raise
