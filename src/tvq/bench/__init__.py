"""Speed and memory benchmarks: ``tvq bench`` (see :mod:`tvq.bench.runner`), and ``tvq recall``
(see :mod:`tvq.bench.recall`)."""

from __future__ import annotations

import argparse

from tvq.bench.args import check_args


def run_bench(args: argparse.Namespace) -> int:
    """``tvq bench`` on its parsed options (:mod:`tvq.bench.args`): every option checked before
    torch is imported, then the sweep."""
    check_args(args)
    from tvq.bench.runner import run

    return run(args)
