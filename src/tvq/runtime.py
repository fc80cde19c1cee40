"""The process the ``tvq`` command runs in: its torchrun rank, and the allocator setting it applies
for CPU speed.

glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh ``mmap`` calls and
returns them on free, so every training step on a long sequence page-faults its large activations
back in: on a 2-core machine a 32k-token step of bench-small spends more than half its time there.
Keeping freed memory in the heap (no mmap, no trimming) makes tokens/s flat in sequence length.
This changes the whole process, so the library never does it on import: only the ``tvq`` command
(and its benchmark subprocesses) call :func:`tune_cpu_allocator`. ``TVQ_KEEP_MALLOC=1`` opts out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)


def tune_cpu_allocator() -> bool:
    """Keep freed memory for reuse (glibc on Linux); returns whether the setting was applied."""
    if os.environ.get("TVQ_KEEP_MALLOC") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))  # C int


def env_rank() -> int:
    """This process's rank as set by torchrun (0 when not launched by it)."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0
