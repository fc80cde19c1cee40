"""Command-line input checking without heavy imports: one-line usage errors and argument types.

Every ``tvq`` subcommand (and ``tvq bench``) parses with :class:`ArgumentParser`, whose errors
raise :class:`UsageError` instead of printing the usage block, so that bad input is always one
line ``tvq: error: ...`` and exit code 2. The argument types check ranges and finiteness while
parsing, before any work is done. Nothing here imports torch: ``--help`` and argument errors stay
fast.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

INT64_MAX = 2**63 - 1


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
