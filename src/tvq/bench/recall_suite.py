"""``tvq recall --suite``: every task of ``--tasks`` at every seed of ``--seeds``, one table.

Per task, the mean over seeds of each variant's accuracy within and beyond the window, the share of the
beyond-window gap between the window alone (``nocache``) and dense attention (``full``) that ``vq``
closes (per seed, then averaged), and the minutes one seed of the task took (all variants). The JSON
keeps every run's record and is rewritten after each (task, seed), so a stopped suite keeps what it ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tvq.bench.recall_train import build, fmt, run_meta, train_task
from tvq.bench.recall_tasks import TASKS


def gap_closed(results: dict) -> float | None:
    """(vq - nocache) / (full - nocache) of the beyond-window accuracy; None without the three variants or
    when full is no better than nocache."""
    try:
        vq, nc, full = (results[v]["eval"]["beyond"]["accuracy"] for v in ("vq", "nocache", "full"))
    except KeyError:
        return None
    if None in (vq, nc, full) or full - nc <= 1e-9:
        return None
    return (vq - nc) / (full - nc)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _sd(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def summarise(runs: dict[str, dict], walls: dict[str, float]) -> dict:
    """The seeds of one task ({seed: {variant: record}}, {seed: wall seconds}) -> per variant the mean and
    sd of the accuracy within / beyond the window, the gap closed, and the minutes of one seed (training,
    and wall time)."""
    variants = list(next(iter(runs.values())))
    out: dict = {"seeds": len(runs), "variants": {}}
    for v in variants:
        rec = {}
        for bucket in ("within", "beyond"):
            xs = [r[v]["eval"][bucket]["accuracy"] for r in runs.values()]
            rec[bucket] = {"mean": _mean(xs), "sd": _sd(xs), "per_seed": xs}
        rec["parameters"] = next(iter(runs.values()))[v]["parameters"]
        out["variants"][v] = rec
    gaps = [gap_closed(r) for r in runs.values()]
    out["gap_closed"] = {"mean": _mean(gaps), "sd": _sd(gaps), "per_seed": gaps}
    out["train_minutes_per_seed"] = _mean([sum(x["train_seconds"] for x in r.values()) / 60 for r in runs.values()])
    out["wall_minutes_per_seed"] = _mean([w / 60 for w in walls.values()])
    return out


def table(summaries: dict[str, dict]) -> str:
    """One row per task: accuracies as vq / nocache / full (means over seeds; variants that ran)."""
    rows = ["| task | seeds | params | within window | beyond window | gap closed | min per seed |",
            "|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        vs = s["variants"]
        first = next(iter(vs.values()))
        acc = {b: " / ".join(fmt(r[b]["mean"]) for r in vs.values()) for b in ("within", "beyond")}
        rows.append(f"| {name} | {s['seeds']} | {first['parameters']:,} | {acc['within']} | {acc['beyond']} | "
                    f"{fmt(s['gap_closed']['mean'], '.2f')} | {s['wall_minutes_per_seed']:.1f} |")
    variants = " / ".join(next(iter(summaries.values()))["variants"])
    return "\n".join(rows) + (f"\n(accuracies: {variants}; gap closed: of the beyond-window gap nocache -> full; "
                              "minutes: wall time of one seed, all variants, scoring included)")


def plot(summaries: dict[str, dict], path: str) -> bool:
    """Bars of accuracy within and beyond the window per task and variant (sd over seeds as error bars);
    False, with a note on stderr, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("tvq recall: matplotlib is not installed: no plot (pip install 'tvq[plot]')", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    variants = list(summaries[names[0]]["variants"])
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(names) + 2), 6), sharex=True)
    for ax, bucket in zip(axes, ("within", "beyond")):
        for k, v in enumerate(variants):
            stats = [summaries[n]["variants"][v][bucket] for n in names]
            ax.bar([i + (k - (len(variants) - 1) / 2) * width for i in range(len(names))],
                   [s["mean"] or 0.0 for s in stats], width, yerr=[s["sd"] or 0.0 for s in stats], label=v)
        ax.set(ylabel=f"accuracy {bucket} the window", ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(variants), fontsize=8)
    axes[1].set_xticks(range(len(names)), names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_suite(args: argparse.Namespace, argv: list[str]) -> int:
    """Train every variant on every task and seed of checked options ``args``; print the table, write
    the JSON (after every run), the plot and the diagnosis summaries asked for."""
    n_runs = sum(len(build(args, name)[1]) for name in args.task_list)  # every config checked before training
    from tqdm import tqdm

    bar = tqdm(total=args.steps * n_runs * len(args.seed_list), disable=args.no_progress, unit="step",
               dynamic_ncols=True)
    record: dict = {"meta": {**run_meta(args, argv), "tasks": args.task_list, "seeds": args.seed_list},
                    "tasks": {}}
    diagnoses: dict = {}
    try:
        for name in args.task_list:
            runs: dict = {}
            walls: dict[str, float] = {}  # seed -> seconds, all variants, scoring included
            for seed in args.seed_list:
                t0 = time.perf_counter()
                task, results = train_task(args, name, seed, bar)
                walls[str(seed)] = time.perf_counter() - t0
                for v, r in results.items():
                    if "diagnosis" in r:
                        diagnoses.setdefault(name, {}).setdefault(str(seed), {})[v] = r.pop("diagnosis")["summary"]
                runs[str(seed)] = results
                record["tasks"][name] = {"about": TASKS[name].about, "task": asdict(task),
                                         "model": TASKS[name].model, "chance": 1 / task.n_values,
                                         "summary": summarise(runs, walls), "wall_seconds": walls, "runs": runs}
                _write(args.json, record)
                _write(args.diagnose, {"meta": record["meta"], "tasks": diagnoses})
    finally:
        bar.close()
    summaries = {n: t["summary"] for n, t in record["tasks"].items()}
    print(table(summaries))
    if args.plot:
        plot(summaries, args.plot)
    return 0


def _write(path: str | None, obj: dict) -> None:
    """obj as JSON to path, if one was asked for."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1))
