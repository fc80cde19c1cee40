"""``tvq recall``: what the compressive cache buys on long-context associative recall.

Trains the same small model as several variants, identical except for attention (``vq``:
Transformer-VQ; ``nocache``: ``agg_cache=False``, the window alone; ``full``: dense attention), from
the same seed on the same batches of a synthetic stream, then scores answer accuracy and loss by how
far back the answer is: within the window (distance <= ``mem_len``), 1-4 windows back, and beyond.

The stream is one of a family (:mod:`tvq.bench.recall_tasks`, docs/recall.md): ``--task`` names a
variant (default ``marked``: free positions, ``? KEY VALUE`` queries) and the stream options change
it. One sequence of ``seq_len`` tokens per row, no state carried between rows; chance accuracy is
1 / n_values. Only answers are trained on (``--loss all``: every next token, filler included).
``--suite`` runs a fixed set of tasks at several seeds (:mod:`tvq.bench.recall_suite`); ``--diagnose``
writes why each answer is (not) recalled (:mod:`tvq.bench.recall_diagnose`). This module holds the
options and the report; the training and scoring are :mod:`tvq.bench.recall_train`.

Also logged: codebook health over training (usage, dead codes, entropy, relative quantization error;
per GAU too) and the collision rate: the fraction of pairs of written VALUE positions of one row whose
keys share a code (those keys must be told apart for the cache to recall either).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from tvq.bench.recall_tasks import DEFAULT_TASK, QUERY, SUITE, TASKS, RecallTask, buckets
from tvq.bench.recall_train import (VARIANTS, CodeRecorder, build, evaluate, fmt, parse_names, run_meta, sized,
                                    task_fields, train_task, train_variant, variant_configs)
from tvq.usage import ArgumentParser, check_writable_file, device_name, float_range, int_range

__all__ = ["QUERY", "SUITE", "TASKS", "CodeRecorder", "RecallTask", "add_arguments", "buckets", "check_args",
           "evaluate", "main", "parse_args", "run", "train_variant", "variant_configs"]


def table(results: dict) -> str:
    rows = ["| variant | params | within window | 1-4 windows | beyond 4 | beyond window (all) | "
            "loss within / beyond | dead codes | collision | train s | tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        e, cb = r["eval"], r["codebook_final"]
        rows.append(f"| {name} | {r['parameters']:,} | {fmt(e['within']['accuracy'])} | "
                    f"{fmt(e['1-4 windows']['accuracy'])} | {fmt(e['beyond 4']['accuracy'])} | "
                    f"{fmt(e['beyond']['accuracy'])} | {fmt(e['within']['loss'], '.2f')} / "
                    f"{fmt(e['beyond']['loss'], '.2f')} | {fmt(cb.get('dead'), '.2f')} | "
                    f"{fmt(e.get('collision'))} | {r['train_seconds']:.0f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(rows)


def plot(results: dict, task: RecallTask, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'tvq[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        pts = r["eval"]["by_distance"]
        ax.plot([(p["lo"] + p["hi"]) / 2 for p in pts], [p["accuracy"] for p in pts], marker="o", ms=3, label=name)
    for k in (1, 4):
        ax.axvline(k * task.window, color="grey", ls=":", lw=1)
    ax.axhline(1 / task.n_values, color="grey", ls="--", lw=1, label="chance")
    ax.set(xlabel="answer distance (tokens)", ylabel="answer accuracy", ylim=(0, 1),
           title=f"associative recall, window {task.window}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tvq recall``, added to its parser ``p``."""
    p.description = __doc__.splitlines()[0].split(": ", 1)[1]
    p.add_argument("--task", default=DEFAULT_TASK, help=f"the stream, a named variant (default {DEFAULT_TASK}; "
                                                        "--list-tasks lists them); the options below change it")
    p.add_argument("--list-tasks", action="store_true", help="list the named tasks and the suite, and exit")
    p.add_argument("--suite", action="store_true", help="run every task of --tasks at every seed of --seeds "
                                                       "and print one table (--json, --plot: of the suite)")
    p.add_argument("--tasks", help="the suite's tasks, comma-separated (default: all but long-4k)")
    p.add_argument("--seeds", help="the suite's seeds, comma-separated (default 0,1,2)")
    p.add_argument("--variants", default="vq,nocache,full", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config key of the vq variants, e.g. --set model.n_code=256")
    p.add_argument("--set-all", dest="base_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config key of every variant (the model's size), e.g. --set-all model.d_model=256")
    p.add_argument("--config", help="JSON dict of model config overrides for the vq variants "
                                    "(e.g. benchmarks/recall_config.json), applied before --set")
    p.add_argument("--loss", choices=["answers", "all"], default="answers",
                   help="train on the answers only (default) or on every next token")
    p.add_argument("--steps", type=int_range(1), default=700, help="optimizer steps per variant (default 700)")
    p.add_argument("--batch-size", type=int_range(1), help="sequences per step (default: the task's, 16 at 256 tokens)")
    p.add_argument("--lr", type=float_range(0.0, lo_open=True), default=3e-3, help="AdamW peak learning rate")
    p.add_argument("--warmup", type=int_range(0), default=50, help="linear warmup steps, then cosine decay to lr / 10")
    p.add_argument("--weight-decay", type=float_range(0.0), default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float_range(0.0, lo_open=True), default=1.0, help="gradient norm clip")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of the weights and the batches")
    p.add_argument("--eval-seqs", type=int_range(1), help="held-out sequences scored at the end (default: the "
                                                          "task's, 512 at 256 tokens)")
    p.add_argument("--log-every", type=int_range(1), default=50, help="steps between codebook health records")
    p.add_argument("--threads", type=int_range(0), default=0, help="intra-op CPU threads (0: torch's default)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    for name, type_, help_ in (
            ("seq_len", int, "tokens per sequence"), ("n_pairs", int, "key-value pairs per sequence"),
            ("n_keys", int, "key tokens (the key pool is n_keys ** key_len)"), ("n_values", int, "value pool"),
            ("n_filler", int, "filler pool"), ("min_dist", int, "shortest answer distance"),
            ("max_dist", int, "longest answer distance"), ("near_frac", float, "share of queries within the window"),
            ("slot_len", int, "items start at multiples of this (1: free positions)"),
            ("key_len", int, "tokens per key"), ("n_distractors", int, "keys written but never queried"),
            ("distractor_repeats", int, "times each distractor is written")):
        p.add_argument("--" + name.replace("_", "-"), type=type_, help=f"{help_} (default: the task's)")
    p.add_argument("--marker", action=argparse.BooleanOptionalAction,
                   help="queries as `? KEY VALUE` (--marker) or `KEY VALUE` (--no-marker) (default: the task's)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="PNG of accuracy against distance, one line per variant (suite: per task)")
    p.add_argument("--diagnose", help="write here, per variant, why each answer is (not) recalled (JSON; "
                                      "suite: the summaries only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` checked before any work: the task names and seeds, every task's stream (built once), the
    output paths writable (before hours of training, not after)."""
    parse_names(args.task, "task", TASKS)
    if not args.suite and (args.tasks or args.seeds):
        raise ValueError("--tasks and --seeds choose the suite's runs: add --suite (one run: --task, --seed)")
    seeds = args.seeds or "0,1,2"
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers >= 0, got {seeds!r}") from None
    if not seed_list or min(seed_list) < 0 or len(set(seed_list)) != len(seed_list):
        raise ValueError(f"--seeds must be distinct integers >= 0, got {seeds!r}")
    args.task_list = parse_names(args.tasks or ",".join(SUITE), "task", TASKS) if args.suite else [args.task]
    args.seed_list = seed_list if args.suite else [args.seed]
    for name in args.task_list:
        try:
            RecallTask(**task_fields(args, name))
        except ValueError as e:
            raise ValueError(f"task {name}: {e}") from None
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--diagnose", args.diagnose)):
        if path:
            check_writable_file(path, flag)
    if args.plot and not args.suite and importlib.util.find_spec("matplotlib") is None:  # the suite skips it
        raise ValueError("--plot needs matplotlib: pip install 'tvq[plot]'")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed and checked options of ``tvq recall`` as a program of its own."""
    p = ArgumentParser(prog="tvq recall")
    add_arguments(p)
    return check_args(p.parse_args(argv))


def list_tasks() -> str:
    """The named tasks, one line each, suite members marked."""
    return "\n".join(f"{'*' if n in SUITE else ' '} {n:<13} {s.about}" for n, s in TASKS.items()) + \
        "\n(* in the suite)"


def main(argv=None) -> int:
    """``tvq recall`` with the options ``argv`` (default: the command line's)."""
    return run(parse_args(argv), sys.argv[2:] if argv is None else argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Train and score every variant of checked options ``args`` (the words ``argv``, kept in the
    JSON record), print the table and write the JSON, plot and diagnosis asked for; ``--suite``: every
    task at every seed (:func:`tvq.bench.recall_suite.run_suite`)."""
    if args.list_tasks:
        print(list_tasks())
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        from tvq.bench.recall_suite import run_suite

        return run_suite(args, argv)
    _, configs = build(args, args.task)  # every config checked before training

    from tqdm import tqdm

    bar = tqdm(total=args.steps * len(configs), disable=args.no_progress, unit="step", dynamic_ncols=True)
    try:
        task, results = train_task(args, args.task, args.seed, bar)
    finally:
        bar.close()
    meta = {**run_meta(sized(args, args.task, args.seed), argv), "task_name": args.task, "task": asdict(task),
            "chance": 1 / task.n_values}
    diagnoses = {name: r.pop("diagnosis") for name, r in results.items() if "diagnosis" in r}
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.plot:
        plot(results, task, args.plot)
    if args.diagnose:
        health = ("step", "usage", "dead", "entropy", "rel_err", "revived", "collision", "per_gau")
        history = {name: [{k: h[k] for k in health if k in h} for h in r["history"] if "dead" in h]
                   for name, r in results.items()}
        out = {"meta": meta, "variants": {name: {**d, "codebook_history": history[name]}
                                          for name, d in diagnoses.items()}}
        Path(args.diagnose).parent.mkdir(parents=True, exist_ok=True)
        Path(args.diagnose).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
