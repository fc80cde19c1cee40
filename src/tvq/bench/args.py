"""``tvq bench`` options, all checked before torch is imported or a case runs.

Output paths (``--json``, ``--plot``) are checked writable here too, so a sweep never runs for
an hour and then fails to save. Only whether a CUDA device exists needs torch
(:func:`tvq.usage.check_device`, called by the runner first).
"""

from __future__ import annotations

import argparse
import importlib.util

from tvq.usage import ArgumentParser, UsageError, check_writable_file, device_name, float_range, int_range

DESCRIPTION = "Speed and memory of vq vs quadratic attention."

IMPLS = ("vq", "full", "sdpa")
MODES = ("train", "forward", "decode")
DTYPE_NAMES = ("bfloat16", "float32")
BENCH_PRESETS = {
    "bench-small": dict(vocab_size=256, d_model=256, d_k=64, d_v=512, n_head=1, n_layer=2, n_code=256,
                        block_len=128, mem_len=128),
    # the paper's 190M enwik8 shape, without dropout
    "enwik8": dict(vocab_size=256, d_model=768, d_k=128, d_v=1536, n_head=1, n_layer=24, n_code=512,
                   block_len=512, mem_len=512),
}


def ints(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise UsageError(f"{flag} must be positive, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tvq bench``, added to its parser ``p``."""
    p.description = DESCRIPTION
    p.add_argument("--mode", default="train", help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument("--impl", default="vq,full,sdpa", help=f"comma-separated: {', '.join(IMPLS)}")
    p.add_argument("--seq-lens", default="2048,8192,32768", help="comma-separated sequence lengths (train, forward)")
    p.add_argument("--decode-positions", default="1024,65536", help="comma-separated context positions (decode)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES), help="compute dtype (autocast)")
    p.add_argument("--batch-size", type=int_range(1), default=1, help="sequences per step (default 1)")
    p.add_argument("--preset", default="bench-small", help=f"model shape, one of {', '.join(BENCH_PRESETS)}")
    p.add_argument("--repeats", type=int_range(1), default=3, help="timed steps per case; the median is reported")
    p.add_argument("--warmup", type=int_range(0), default=1, help="untimed steps before timing (default 1)")
    p.add_argument("--decode-steps", type=int_range(1), default=64, help="decode: tokens per timed step")
    p.add_argument("--time-budget", type=float_range(0.0, lo_open=True), default=300.0,
                   help="seconds per case before it is reported as a timeout")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train, forward) or the decode step")
    p.add_argument("--threads", type=int_range(0), default=0, help="intra-op CPU threads per case (default: one per core)")
    p.add_argument("--processes", type=int_range(1), default=1,
                   help="run each case in this many fresh processes and report the median (on a shared machine "
                        "the speed of a whole process can differ by 10-20%% from the next one's)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="train: recompute each layer in backward (activation checkpointing), every impl")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                   help="a model config field for every case, e.g. --set head_type=mqa (repeatable)")
    p.add_argument("--json", help="write the records here (JSON)")
    p.add_argument("--plot", help="write a log-log PNG of tokens/s against length here (needs tvq[plot])")


def parser() -> ArgumentParser:
    """The parser of ``tvq bench`` as a program of its own (``python -m tvq.bench``)."""
    p = ArgumentParser(prog="tvq bench")
    add_arguments(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and checked options; UsageError names the first bad one."""
    return check_args(parser().parse_args(argv))


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` once every option is checked beyond its type; UsageError names the first bad one."""
    bad = [m for m in args.mode.split(",") if m not in MODES] + [i for i in args.impl.split(",") if i not in IMPLS]
    if bad:
        raise UsageError(f"unknown mode/impl {', '.join(bad)}; modes: {', '.join(MODES)}; impls: {', '.join(IMPLS)}")
    if args.preset not in BENCH_PRESETS:
        raise UsageError(f"unknown bench preset {args.preset!r}; choose one of {', '.join(BENCH_PRESETS)}")
    ints(args.seq_lens, "--seq-lens")
    ints(args.decode_positions, "--decode-positions")
    if args.json:
        check_writable_file(args.json, "--json")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install 'tvq[plot]'")
        check_writable_file(args.plot, "--plot")
    return args
