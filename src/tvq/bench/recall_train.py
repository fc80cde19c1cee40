"""The training and scoring of ``tvq recall`` (the command: :mod:`tvq.bench.recall`; ``--suite``:
:mod:`tvq.bench.recall_suite`): the model variants and their configs, one variant trained on a task's
stream and scored by answer distance, one task at one seed (every variant).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from tvq.bench.recall_diagnose import HookRecorder, code_health, diagnose
from tvq.bench.recall_tasks import DEFAULT_TASK, TASKS, RecallTask, buckets
from tvq.config import TransformerVQConfig
from tvq.models.transformer_vq import IGNORE_INDEX, TransformerVQ
from tvq.overrides import parse_model_overrides
from tvq.schedule import lr_at

VARIANTS = {"vq": {}, "nocache": {"agg_cache": False}, "full": {"attention": "full"}}
VQ_VARIANTS = ("vq", "nocache")  # the ones --set and --config change
BASE_MODEL = dict(d_model=128, d_k=64, d_v=256, n_head=1, n_layer=2, n_code=128, block_len=32, mem_len=32)
STREAM_FIELDS = [f.name for f in fields(RecallTask) if f.name != "window"]  # set by the task and the options


class CodeRecorder(HookRecorder):
    """Keeps the codes each quantizer assigned since :meth:`clear` (forward hooks; a forward that runs
    in segments calls each quantizer once per segment)."""

    def __init__(self, model: TransformerVQ):
        quantizers = model._quantizers()
        super().__init__(len(quantizers))
        self.handles = [q.register_forward_hook(lambda m, a, out, i=i: self._keep(i, out.codes))
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


@torch.no_grad()
def evaluate(model: TransformerVQ, data, task: RecallTask, batch_size: int | None = None) -> dict:
    """Answer accuracy and loss by distance bucket and in bins of distance, plus the collision rate
    (``batch_size`` rows per forward; default 16,384 tokens' worth)."""
    batch_size = batch_size or max(1, 16384 // task.seq_len)
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
                    record["per_gau"] = code_health(model, recorder.codes)
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
    if args.diagnose:
        result["diagnosis"] = diagnose(model, eval_data, task.value_ids)
    return result


def fmt(x, spec=".3f") -> str:
    """x formatted, or "-" for None."""
    return "-" if x is None else format(x, spec)


def parse_names(text: str, what: str, known) -> list[str]:
    """The comma-separated names of ``text``, each in ``known``, none twice."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in known]
    if bad or not names:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} listed twice: {text}")
    return names


def task_fields(args, name: str) -> dict:
    """The :class:`RecallTask` fields (but the window) of task ``name`` with the stream options given."""
    out = dict(TASKS[name].stream)
    out.update({k: getattr(args, k) for k in STREAM_FIELDS if getattr(args, k) is not None})
    return out


def variant_configs(args, vocab_size: int, task: str | None = None) -> dict[str, TransformerVQConfig]:
    """The model config of each variant: the base, the task's model overrides (its key width), --set-all,
    the variant's attention, then (vq variants) the --config file and --set overrides. Raises ValueError
    on an unknown variant or key."""
    names = parse_names(args.variants, "variant", VARIANTS)
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
    base = {**BASE_MODEL, **TASKS[task or getattr(args, "task", DEFAULT_TASK)].model,
            **parse_model_overrides(args.base_overrides, "--set-all")}
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


def build(args, name: str) -> tuple[RecallTask, dict[str, TransformerVQConfig]]:
    """Task ``name``'s stream (its window the models' mem_len) and the model config of each variant."""
    probe = RecallTask(**task_fields(args, name))
    configs = variant_configs(args, probe.vocab_size, name)
    windows = {c.mem_len for c in configs.values()}
    if len(windows) > 1:
        raise ValueError(f"the variants have different mem_len {sorted(windows)}; set model.mem_len for all")
    return RecallTask(**task_fields(args, name), window=windows.pop()), configs


def sized(args, name: str, seed: int) -> argparse.Namespace:
    """``args`` for one run of task ``name`` at ``seed``: its batch size and held-out rows filled in."""
    spec = TASKS[name]
    return argparse.Namespace(**{**vars(args), "seed": seed, "batch_size": args.batch_size or spec.batch_size,
                                 "eval_seqs": args.eval_seqs or spec.eval_seqs})


def train_task(args, name: str, seed: int, bar=None) -> tuple[RecallTask, dict]:
    """Train and score every variant on task ``name`` at ``seed``: -> (the task, {variant: record})."""
    run_args = sized(args, name, seed)
    task, configs = build(args, name)
    eval_data = task.batch(np.random.default_rng([seed, 1]), run_args.eval_seqs)  # held out: another stream
    results = {}
    for variant, cfg in configs.items():
        results[variant] = train_variant(variant, cfg, task, run_args, eval_data, bar)
        e = results[variant]["eval"]
        if bar is not None:
            bar.write(f"{name} seed {seed} {variant}: accuracy within the window {fmt(e['within']['accuracy'])}, "
                      f"beyond {fmt(e['beyond']['accuracy'])} ({results[variant]['train_seconds']:.0f} s)")
    return task, results


def run_meta(args, argv: list[str]) -> dict:
    """What a JSON record keeps of the run: the command, the training options, the machine."""
    return {"command": "tvq recall " + " ".join(shlex.quote(a) for a in argv),
            "train": {k: getattr(args, k) for k in ("loss", "steps", "batch_size", "lr", "warmup", "weight_decay",
                                                    "grad_clip", "seed", "eval_seqs")},
            "threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
