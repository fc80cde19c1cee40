"""Command-line input checking without heavy imports: one-line usage errors and argument types.

Every ``tvq`` subcommand (and ``tvq bench``) parses with :class:`ArgumentParser`, whose errors
raise :class:`UsageError` instead of printing the usage block, and runs under
:func:`run_command`, so that bad input is always one line ``tvq: error: ...`` and exit code 2.
The argument types check ranges and finiteness while parsing, before any work is done. Nothing
here imports torch on import (only :func:`check_device` does, when called): ``--help`` and
argument errors stay fast.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tvq.config import INT64_MAX
from tvq.runtime import env_rank


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors raise :class:`UsageError` (one line, no usage block)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _int(text: str) -> int:
    """An integer, also written as ``1e6`` or ``1_000_000``; ValueError otherwise."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # raises ValueError for non-numbers
        if not math.isfinite(value) or value != int(value):
            raise ValueError(text) from None
        return int(value)


def int_range(lo: int, hi: int = INT64_MAX):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = _int(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            bound = f">= {lo}" if hi == INT64_MAX else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in the interval from lo to hi (open ends as asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not math.isfinite(value) or not inside:
            if hi == math.inf:
                interval = f"{'>' if lo_open else '>='} {lo:g}"
            else:
                interval = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number {interval}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


_DEVICE = re.compile(r"(cpu|cuda|cuda:\d+|mps)")


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (availability is checked later)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda or cuda:N")
    return text


def checkpoint_name(text: str) -> str:
    """An argparse type: ``latest``, ``best`` or a step number."""
    if text in ("latest", "best"):
        return text
    if not text.isdigit() or int(text) > INT64_MAX:
        raise argparse.ArgumentTypeError(f"expected latest, best or a step number, got {text!r}")
    return str(int(text))


def check_writable_file(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, a read-only file,
    a parent folder that is missing or read-only. Creates nothing."""
    path = Path(path)
    if str(path) == "":
        raise UsageError(f"{what}: empty path")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file path")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UsageError(f"{what} {path} is not writable")
        return path
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: the folder {parent} does not exist" if not parent.exists()
                         else f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: the folder {parent} is not writable")
    return path


def check_creatable(path: str | Path, what: str) -> None:
    """Refuse a folder that neither exists writable nor can be made: its nearest existing
    ancestor must be a writable folder. Creates nothing."""
    path = Path(os.path.abspath(path))
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: {ancestor} is not writable")


def check_device(name: str | None, hint: bool = True) -> str:
    """The device to run on (None: cuda when available, else cpu), checked to exist; imports torch.
    ``hint``: the errors end by pointing to ``--device cpu``."""
    import torch

    to_cpu = "; use --device cpu" if hint else ""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available{to_cpu}")
        if int(name.partition(":")[2] or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device mps: MPS is not available here{to_cpu}")
    return name


def os_error_line(e: OSError) -> str:
    """One line for a failed file operation: what, where, and for a full or read-only disk what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    text = f"{e.strerror or e}" + (f": {where}" if where else "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free some space (the last complete checkpoint is intact)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        text += "; choose a writable location"
    return text


def run_command(command: Callable[[], int]) -> int:
    """``command()``'s exit code, reporting the way every ``tvq`` command does: bad input, a failed
    file operation or running out of memory is one line ``tvq: error: ...`` on stderr and exit code
    2; a reader of stdout that went away ends it quietly (0); an interrupt is 130. Any other error
    is a bug or a failed collective, and its traceback is the report."""
    try:
        return command()
    except BrokenPipeError:  # the reader of stdout went away (tvq sample ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, ImportError, OSError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and type(e).__name__ != "OutOfMemoryError":
            raise  # a bug or a failed collective: the traceback is the report
        if isinstance(e, (MemoryError, RuntimeError)):
            message = "out of memory; use a smaller model, batch_size or update_len, or more grad_accum"
        elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError) or (
                isinstance(e, FileNotFoundError) and e.filename is not None):
            message = os_error_line(e)
        else:
            message = str(e)
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        rank = env_rank()
        print(f"tvq: error: {message}" if rank == 0 else f"tvq: error (rank {rank}): {message}", file=sys.stderr)
        if rank != 0:  # torchrun stops every worker once one fails: let rank 0 report first (a loaded
            time.sleep(30)  # machine can hold it back for seconds; torchrun ends this wait once rank 0 exits)
        return 2
    except KeyboardInterrupt:
        print("tvq: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
