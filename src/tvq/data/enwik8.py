"""enwik8: the first 10^8 bytes of the English Wikipedia XML dump of 2006-03-03 (Hutter Prize).

The standard byte-level split is the first 90M bytes for train, the next 5M for validation and
the last 5M for test. `enwik8.zip` is downloaded once into the cache folder; its single member
`enwik8` is checked against the size and MD5 that Matt Mahoney publishes for it on
http://mattmahoney.net/dc/textdata.html (Large Text Compression Benchmark).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

from tvq.data.cache import resolve_cache_dir
from tvq.data.corpus import Corpus, split_90_5_5, split_from_raw
from tvq.data.tokenizer import ByteTokenizer, Tokenizer

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"  # of the unzipped file, as published on textdata.html


def fetch_enwik8(cache_dir: str | Path | None = None, *, url: str = ENWIK8_URL) -> Path:
    """Path of `enwik8.zip` in the cache folder, downloading it from `url` only if absent."""
    zip_path = resolve_cache_dir(cache_dir) / "enwik8.zip"
    if zip_path.is_file():
        return zip_path
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    partial = zip_path.with_name(f"enwik8.zip.part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
    except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"enwik8.zip is not in the cache and downloading {url} failed ({err}); "
            f"download it by hand and save it as {zip_path}"
        ) from err
    os.replace(partial, zip_path)
    return zip_path


def read_enwik8(zip_path: str | Path, *, expected_size: int = ENWIK8_SIZE, expected_md5: str = ENWIK8_MD5) -> bytes:
    """The bytes of the `enwik8` member of `zip_path`, verified against `expected_size` and `expected_md5`."""
    zip_path = Path(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            data = zf.read("enwik8")
    except (zipfile.BadZipFile, KeyError) as err:
        raise ValueError(
            f"{zip_path} is not a zip holding the file enwik8 ({err}); delete it and load enwik8 again to re-download"
        ) from err
    md5 = hashlib.md5(data).hexdigest()
    if len(data) != expected_size or md5 != expected_md5:
        raise ValueError(
            f"{zip_path} holds {len(data)} bytes (md5 {md5}), expected {expected_size} (md5 {expected_md5}); "
            "delete it and load enwik8 again to re-download"
        )
    return data


def load_enwik8(
    cache_dir: str | Path | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    url: str = ENWIK8_URL,
    expected_size: int = ENWIK8_SIZE,
    expected_md5: str = ENWIK8_MD5,
) -> Corpus:
    """enwik8 split 90% / 5% / 5% by bytes (90M / 5M / 5M), each split one document; byte-level by default.

    `url`, `expected_size` and `expected_md5` exist for mirrors and for testing on small files.
    """
    data = read_enwik8(fetch_enwik8(cache_dir, url=url), expected_size=expected_size, expected_md5=expected_md5)
    n_train, n_validation, _ = split_90_5_5(len(data))
    parts = {
        "train": data[:n_train],
        "validation": data[n_train : n_train + n_validation],
        "test": data[n_train + n_validation :],
    }
    tokenizer = tokenizer or ByteTokenizer()
    splits = {name: split_from_raw([part], tokenizer) for name, part in parts.items()}
    return Corpus(name="enwik8", tokenizer=tokenizer, vocab_size=tokenizer.vocab_size, splits=splits)
