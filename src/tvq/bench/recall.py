"""``tvq recall``: what the compressive cache buys on long-context associative recall.

Trains the same small model as several variants, identical except for attention (``vq``:
Transformer-VQ; ``nocache``: ``agg_cache=False``, the window alone; ``full``: dense attention), from
the same seed on the same batches of a synthetic stream, then scores answer accuracy and loss by how
far back the answer is: within the window (distance <= ``mem_len``), 1-4 windows back, and beyond.

The stream (one sequence of ``seq_len`` tokens per row, no state carried between rows): random filler
tokens, into which ``n_pairs`` pairs ``KEY VALUE`` are written and each key is later queried once as
``? KEY VALUE``. The answer is the VALUE, predicted at the query's KEY; its distance is the number of
tokens from the written VALUE to the query's KEY. Keys are distinct within a row, values drawn with
replacement (chance accuracy 1 / n_values). A share ``near_frac`` of the queries have a distance in
[min_dist, mem_len], the others in (mem_len, max_dist]. Only answers are trained on (``--loss all``:
every next token, filler included).

Also logged: codebook health over training (usage, dead codes, entropy, relative quantization error)
and the collision rate: the fraction of pairs of written VALUE positions of one row whose keys share
a code (those keys must be told apart for the cache to recall either).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from tvq.config import TransformerVQConfig
from tvq.models.transformer_vq import IGNORE_INDEX, TransformerVQ
from tvq.overrides import parse_model_overrides
from tvq.schedule import lr_at
from tvq.usage import ArgumentParser, check_writable_file, device_name, float_range, int_range

VARIANTS = {"vq": {}, "nocache": {"agg_cache": False}, "full": {"attention": "full"}}
VQ_VARIANTS = ("vq", "nocache")  # the ones --set and --config change
BASE_MODEL = dict(d_model=128, d_k=64, d_v=256, n_head=1, n_layer=2, n_code=128, block_len=32, mem_len=32)
QUERY = 0  # the query marker token; keys, values and filler follow it in the vocabulary


@dataclass
class RecallTask:
    """The synthetic stream's shape (see the module docstring)."""

    seq_len: int = 256
    n_pairs: int = 16
    n_keys: int = 32
    n_values: int = 32
    n_filler: int = 63
    min_dist: int = 2
    max_dist: int = 253
    near_frac: float = 0.25
    window: int = 32  # the models' mem_len: where "near" distances end

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_pairs", "n_keys", "n_values", "n_filler", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs ({self.n_pairs}) must be <= n_keys ({self.n_keys}): keys are distinct in a row")
        if 5 * self.n_pairs > self.seq_len:
            raise ValueError(f"{self.n_pairs} pairs take {5 * self.n_pairs} tokens, more than seq_len {self.seq_len}")
        if not 2 <= self.min_dist <= self.max_dist <= self.seq_len - 3:
            raise ValueError(f"need 2 <= min_dist <= max_dist <= seq_len - 3 = {self.seq_len - 3}, "
                             f"got min_dist {self.min_dist}, max_dist {self.max_dist}")
        if not 0.0 <= self.near_frac <= 1.0:
            raise ValueError(f"near_frac must be in [0, 1], got {self.near_frac}")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values + self.n_filler

    def _distance(self, rng: np.random.Generator) -> int:
        near_hi = min(self.window, self.max_dist)
        if self.min_dist > near_hi or (self.max_dist > near_hi and rng.random() >= self.near_frac):
            return int(rng.integers(max(near_hi + 1, self.min_dist), self.max_dist + 1))
        return int(rng.integers(self.min_dist, near_hi + 1))

    def batch(self, rng: np.random.Generator, batch_size: int):
        """-> ids (B, T), labels (B, T) (the value at each query's KEY, else -100), distance (B, T)
        (0 except at answers), written (B, n_pairs) the positions of the written VALUEs."""
        T, P = self.seq_len, self.n_pairs
        key0, val0, fill0 = 1, 1 + self.n_keys, 1 + self.n_keys + self.n_values
        ids = rng.integers(fill0, fill0 + self.n_filler, size=(batch_size, T))
        labels = np.full((batch_size, T), IGNORE_INDEX)
        dist = np.zeros((batch_size, T), dtype=np.int64)
        written = np.zeros((batch_size, P), dtype=np.int64)
        for b in range(batch_size):
            free = np.ones(T, dtype=bool)
            keys = rng.choice(self.n_keys, size=P, replace=False) + key0
            values = rng.integers(val0, val0 + self.n_values, size=P)
            for i in range(P):
                for _ in range(1000):
                    d = self._distance(rng)
                    w = int(rng.integers(0, T - d - 2))  # KEY VALUE at w, w+1; ? KEY VALUE at w+d..w+d+2
                    slots = [w, w + 1, w + d, w + d + 1, w + d + 2]
                    if free[slots].all():
                        break
                else:
                    raise ValueError(f"could not place {P} pairs in {T} tokens with distances "
                                     f"{self.min_dist}..{self.max_dist}; use fewer pairs or longer sequences")
                free[slots] = False
                ids[b, slots] = [keys[i], values[i], QUERY, keys[i], values[i]]
                labels[b, w + d + 1] = values[i]
                dist[b, w + d + 1] = d
                written[b, i] = w + 1
        return (torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(dist),
                torch.from_numpy(written))


def buckets(window: int) -> dict[str, tuple[int, float]]:
    """Distance buckets (lo, hi], as multiples of the window."""
    return {"within": (0, window), "1-4 windows": (window, 4 * window), "beyond 4": (4 * window, math.inf),
            "beyond": (window, math.inf)}


class CodeRecorder:
    """Keeps the codes each quantizer assigned since :meth:`clear` (forward hooks; a forward that runs
    in segments calls each quantizer once per segment)."""

    def __init__(self, model: TransformerVQ):
        quantizers = model._quantizers()
        self._parts: list[list] = [[] for _ in quantizers]
        self.handles = [q.register_forward_hook(lambda m, a, out, i=i: self._parts[i].append(out.codes.detach()))
                        for i, q in enumerate(quantizers)]

    @property
    def codes(self) -> list:
        """Per quantizer, the codes (B, H, T) of the tokens seen since the last clear."""
        return [torch.cat(parts, 2) for parts in self._parts if parts]

    def collision(self, written) -> list[float]:
        """Per GAU: the fraction of pairs of written VALUE positions of a row (and head) sharing a code."""
        P = written.shape[1]
        if P < 2:
            return [0.0 for _ in self.codes]
        upper = torch.triu(torch.ones(P, P, dtype=torch.bool, device=written.device), 1)
        rates = []
        for codes in self.codes:  # (B, H, T)
            at = codes.gather(2, written[:, None].expand(-1, codes.shape[1], -1))  # (B, H, P)
            same = at[..., :, None] == at[..., None, :]  # (B, H, P, P)
            rates.append(same[..., upper].float().mean().item())
        return rates

    def clear(self) -> None:
        self._parts = [[] for _ in self._parts]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def evaluate(model: TransformerVQ, data, task: RecallTask, batch_size: int = 64) -> dict:
    """Answer accuracy and loss by distance bucket and in bins of distance, plus the collision rate."""
    model.eval()
    recorder = CodeRecorder(model)
    correct, losses, dists, collisions = [], [], [], []
    try:
        ids, labels, dist, written = (t.to(model.embed.weight.device) for t in data)
        for lo in range(0, ids.shape[0], batch_size):
            recorder.clear()
            logits = model(ids[lo: lo + batch_size]).logits.float()
            lab, d = labels[lo: lo + batch_size], dist[lo: lo + batch_size]
            at = lab != IGNORE_INDEX
            correct.append((logits[at].argmax(-1) == lab[at]).float())
            losses.append(F.cross_entropy(logits[at], lab[at], reduction="none"))
            dists.append(d[at])
            if recorder.codes:
                collisions.append(recorder.collision(written[lo: lo + batch_size]))
    finally:
        recorder.close()
        model.train()
    correct, losses, dists = torch.cat(correct), torch.cat(losses), torch.cat(dists).float()
    out = {"answers": int(correct.numel())}
    for name, (lo, hi) in buckets(task.window).items():
        sel = (dists > lo) & (dists <= hi)
        n = int(sel.sum())
        out[name] = {"n": n, "accuracy": correct[sel].mean().item() if n else None,
                     "loss": losses[sel].mean().item() if n else None}
    width = max(task.window // 2, 1)
    out["by_distance"] = []
    for lo in range(0, task.max_dist, width):
        sel = (dists > lo) & (dists <= lo + width)
        if int(sel.sum()):
            out["by_distance"].append({"lo": lo, "hi": lo + width, "n": int(sel.sum()),
                                       "accuracy": correct[sel].mean().item()})
    if collisions:
        per_gau = np.mean(np.array(collisions), 0).tolist()
        out["collision"] = float(np.mean(per_gau))
        out["collision_per_gau"] = per_gau
    return out


def train_variant(name: str, cfg: TransformerVQConfig, task: RecallTask, args, eval_data, bar=None) -> dict:
    """Train one variant on the shared batch stream; -> its record."""
    torch.manual_seed(args.seed)
    model = TransformerVQ(cfg).to(args.device)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                             {"params": others, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
    rng = np.random.default_rng([args.seed, 0])  # the same batches for every variant
    recorder = CodeRecorder(model)
    history, seconds, loss_sum, n_loss = [], 0.0, 0.0, 0
    model.train()
    try:
        for step in range(args.steps):
            ids, labels, _, written = (t.to(args.device) for t in task.batch(rng, args.batch_size))
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)  # cosine decay to lr / 10
            recorder.clear()
            if args.loss == "all":  # next-token targets everywhere (filler too), not only the answers
                labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], 1)
            out = model(ids, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            codebook = model.update_codebooks()
            seconds += time.perf_counter() - t0
            loss_sum, n_loss = loss_sum + out.lm_loss.item(), n_loss + 1
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                record = {"step": done, "train_loss": loss_sum / n_loss, **codebook}
                if recorder.codes:
                    record["collision"] = float(np.mean(recorder.collision(written)))
                if model.attns[0].cache_bias is not None:  # the learned offsets, per GAU and head
                    record["cache_bias"] = [g.cache_bias.tolist() for g in model.attns]
                history.append(record)
                loss_sum, n_loss = 0.0, 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(variant=name, loss=f"{out.lm_loss.item():.3f}")
    finally:
        recorder.close()
    result = {"config": cfg.to_dict(), "parameters": model.num_parameters(), "train_seconds": seconds,
              "tokens_per_s": args.steps * args.batch_size * task.seq_len / seconds,
              "eval": evaluate(model, eval_data, task), "history": history}
    last = history[-1]
    result["codebook_final"] = {k: last[k] for k in ("usage", "dead", "entropy", "rel_err") if k in last}
    return result


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    rows = ["| variant | params | within window | 1-4 windows | beyond 4 | beyond window (all) | "
            "loss within / beyond | dead codes | collision | train s | tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        e, cb = r["eval"], r["codebook_final"]
        rows.append(f"| {name} | {r['parameters']:,} | {_fmt(e['within']['accuracy'])} | "
                    f"{_fmt(e['1-4 windows']['accuracy'])} | {_fmt(e['beyond 4']['accuracy'])} | "
                    f"{_fmt(e['beyond']['accuracy'])} | {_fmt(e['within']['loss'], '.2f')} / "
                    f"{_fmt(e['beyond']['loss'], '.2f')} | {_fmt(cb.get('dead'), '.2f')} | "
                    f"{_fmt(e.get('collision'))} | {r['train_seconds']:.0f} | {r['tokens_per_s']:,.0f} |")
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
    d = RecallTask()
    p.description = __doc__.splitlines()[0].split(": ", 1)[1]
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
    p.add_argument("--batch-size", type=int_range(1), default=16, help="sequences per step (default 16)")
    p.add_argument("--lr", type=float_range(0.0, lo_open=True), default=3e-3, help="AdamW peak learning rate")
    p.add_argument("--warmup", type=int_range(0), default=50, help="linear warmup steps, then cosine decay to lr / 10")
    p.add_argument("--weight-decay", type=float_range(0.0), default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float_range(0.0, lo_open=True), default=1.0, help="gradient norm clip")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of the weights and the batches")
    p.add_argument("--eval-seqs", type=int_range(1), default=512, help="held-out sequences scored at the end")
    p.add_argument("--log-every", type=int_range(1), default=50, help="steps between codebook health records")
    p.add_argument("--threads", type=int_range(0), default=0, help="intra-op CPU threads (0: torch's default)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    for name, help_ in (("seq_len", "tokens per sequence"), ("n_pairs", "key-value pairs per sequence"),
                        ("n_keys", "key pool"), ("n_values", "value pool"), ("n_filler", "filler pool"),
                        ("min_dist", "shortest answer distance (>= 2)"), ("max_dist", "longest answer distance"),
                        ("near_frac", "share of queries within the window")):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=getattr(d, name),
                       help=f"{help_} (default {getattr(d, name)})")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="PNG of accuracy against distance, one line per variant")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the output paths checked writable: before hours of training, not after."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable_file(path, flag)
    return args


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed and checked options of ``tvq recall`` as a program of its own."""
    p = ArgumentParser(prog="tvq recall")
    add_arguments(p)
    return check_args(p.parse_args(argv))


def variant_configs(args, vocab_size: int) -> dict[str, TransformerVQConfig]:
    """The model config of each variant: the base, the variant's attention, then (vq variants) the
    --config file and --set overrides. Raises ValueError on an unknown variant or key."""
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise ValueError(f"unknown variant(s) {', '.join(bad) or '(none)'}; choose from {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--variants lists a variant twice: {args.variants}")
    extra: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config {path} does not exist")
        try:
            extra = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path} is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--config {path} must hold a JSON dict of model config keys")
    extra.update(parse_model_overrides(args.overrides, "--set"))
    base = dict(BASE_MODEL, **parse_model_overrides(args.base_overrides, "--set-all"))
    for name in ("vocab_size", "attention"):
        if name in extra or name in base:
            raise ValueError(f"model.{name} is set by the benchmark (the task's vocabulary; the variant)")
    base["vocab_size"] = vocab_size
    configs = {}
    for name in names:
        cfg = dict(base, **VARIANTS[name])
        if name in VQ_VARIANTS:
            cfg.update(extra)
            cfg.update(VARIANTS[name])
        configs[name] = TransformerVQConfig.from_dict(cfg)
    return configs


def main(argv=None) -> int:
    """``tvq recall`` with the options ``argv`` (default: the command line's)."""
    return run(parse_args(argv), sys.argv[2:] if argv is None else argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Train and score every variant of checked options ``args`` (the words ``argv``, kept in the
    JSON record), print the table and write the JSON and plot asked for."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    task_fields = {k: getattr(args, k) for k in asdict(RecallTask()) if k != "window"}
    probe = RecallTask(**task_fields)
    configs = variant_configs(args, probe.vocab_size)
    windows = {c.mem_len for c in configs.values()}
    if len(windows) > 1:
        raise ValueError(f"the variants have different mem_len {sorted(windows)}; set model.mem_len for all")
    task = RecallTask(**task_fields, window=windows.pop())
    if args.threads:
        torch.set_num_threads(args.threads)
    eval_data = task.batch(np.random.default_rng([args.seed, 1]), args.eval_seqs)  # held out: another stream

    from tqdm import tqdm

    command = "tvq recall " + " ".join(shlex.quote(a) for a in argv)
    bar = tqdm(total=args.steps * len(configs), disable=args.no_progress, unit="step", dynamic_ncols=True)
    results = {}
    try:
        for name, cfg in configs.items():
            results[name] = train_variant(name, cfg, task, args, eval_data, bar)
            e = results[name]["eval"]
            bar.write(f"{name}: accuracy within the window {_fmt(e['within']['accuracy'])}, "
                      f"beyond {_fmt(e['beyond']['accuracy'])} ({results[name]['train_seconds']:.0f} s)")
    finally:
        bar.close()
    meta = {"command": command, "task": asdict(task), "chance": 1 / task.n_values,
            "train": {k: getattr(args, k) for k in ("loss", "steps", "batch_size", "lr", "warmup", "weight_decay",
                                                    "grad_clip", "seed", "eval_seqs")},
            "threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.plot:
        plot(results, task, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
