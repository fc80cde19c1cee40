"""Files and folders written whole or not at all: a reader, or a process killed mid-write, never
sees a partial one."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_dir_atomic(final: Path, write: Callable[[Path], object], replace: bool = True) -> None:
    """Make folder ``final`` with ``write(tmp)``, which fills a temporary folder beside it
    (``.tmp-NAME-*``); its files are flushed to disk, then it is renamed to ``final``, replacing an
    existing one (moved aside as ``.old-NAME-*`` first, then removed), or with ``replace=False``
    raising ``FileExistsError`` if one has appeared. On failure only the temporary folder goes."""
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if final.exists() and not replace:
            raise FileExistsError(final)
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``.NAME.tmp`` beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
