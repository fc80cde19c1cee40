"""The training loop: update segments with carried state, one codebook update per step."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tvq.data import ByteTokenizer, SentencePieceTokenizer, load_corpus
from tvq.models.transformer_vq import TransformerVQ
from tvq.training import checkpoint as ckpt
from tvq.training.batches import SegmentSampler
from tvq.training.config import TrainConfig
from tvq.training.evaluate import evaluate

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.model"  # a run's SentencePiece model, kept beside its checkpoints


def run_tokenizer(run_dir: str | Path):
    """The SentencePiece tokenizer a run was trained with, or None for the source's default."""
    path = Path(run_dir) / TOKENIZER_FILE
    return SentencePieceTokenizer(path) if path.is_file() else None


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(cfg: TrainConfig, model: TransformerVQ) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only, or Adafactor."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl, and to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS_FILE
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.tb = None
        else:
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def __call__(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def resume_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The config saved in RUN_DIR, with ``max_steps`` from ``cfg`` (extending a run is allowed)."""
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise ValueError(f"--resume: {run_dir} has no {CONFIG_FILE}; start a new run instead")
    prior = TrainConfig.from_dict(json.loads(saved.read_text()))
    prior.max_steps = cfg.max_steps
    return prior


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to start a new run where one already is."""
    if (run_dir / CONFIG_FILE).exists() or ckpt.latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")


def create_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Create RUN_DIR for a new run and save its config; never touch an existing run."""
    check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, device: str | None = None,
          progress: bool = True, log=print) -> dict:
    """Train ``cfg`` into ``run_dir``; returns the final validation metrics."""
    run_dir = Path(run_dir)
    if resume:
        cfg = resume_config(cfg, run_dir)
    else:
        check_new_run_dir(run_dir)  # fail fast, before loading data
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    corpus = load_corpus(cfg.data, tokenizer=SentencePieceTokenizer(cfg.tokenizer) if cfg.tokenizer else None)
    if corpus.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"data {cfg.data!r} has vocabulary {corpus.vocab_size} but the model has "
                         f"{cfg.model.vocab_size}; use --set model.vocab_size={corpus.vocab_size}")
    train_split, val_split = corpus.split("train"), corpus.split("validation")
    sampler = SegmentSampler(train_split, cfg)
    if not resume:  # everything checked: only now does the run directory appear
        create_run_dir(cfg, run_dir)
    if isinstance(corpus.tokenizer, SentencePieceTokenizer) and not (run_dir / TOKENIZER_FILE).exists():
        shutil.copyfile(corpus.tokenizer.path, run_dir / TOKENIZER_FILE)
    byte_level = isinstance(corpus.tokenizer, ByteTokenizer)
    bytes_per_token = 1.0 if byte_level else train_split.n_bytes / len(train_split.tokens)

    model = TransformerVQ(cfg.model).to(device)
    optimizer = make_optimizer(cfg, model)
    start_step, best_loss = 0, math.inf
    micro = cfg.batch_size // cfg.grad_accum
    states: list = [None] * cfg.grad_accum
    if resume and (last := ckpt.latest_checkpoint(run_dir)) is not None:
        ckpt.load_weights(model, last)
        ts = ckpt.load_train_state(last)
        optimizer.load_state_dict(ts["optimizer"])
        _set_rng_state(ts["rng"])
        start_step, best_loss = ts["step"], ts["best_loss"]
        states = [None if s is None else s.to(device=device) for s in ts["states"]]
        log(f"resuming {run_dir} from step {start_step}")
    elif resume:
        log(f"--resume: no checkpoint in {run_dir} yet, starting from step 0")
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.model.n_gau} GAUs; "
        f"data: {cfg.data} ({len(train_split.tokens):,} training tokens)")

    amp = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if amp else contextlib.nullcontext
    tokens_per_step = cfg.batch_size * cfg.update_len
    metrics_log = MetricsLog(run_dir)
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    val = {}
    train_time, model_steps = 0.0, 0  # since the last log record; excludes evaluation and saving
    model.train()
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        if sampler.is_sequence_start(step):
            states = [None] * cfg.grad_accum
        inputs, labels = sampler.batch(step)
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = lm_sum = 0.0
        for m in range(cfg.grad_accum):
            rows = slice(m * micro, (m + 1) * micro)
            with autocast():
                out = model(inputs[rows].to(device), state=states[m], labels=labels[rows].to(device))
            (out.loss / cfg.grad_accum).backward()
            states[m] = out.state.detach()
            loss_sum += out.loss.item() / cfg.grad_accum
            lm_sum += out.lm_loss.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        codebook = model.update_codebooks()
        train_time += time.perf_counter() - t0
        model_steps += 1
        done = step + 1
        bpb = lm_sum / math.log(2) / bytes_per_token
        tokens_per_s = tokens_per_step * model_steps / train_time
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", bpb=f"{bpb:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            metrics_log({"step": done, "loss": loss_sum, "lm_loss": lm_sum, "bpb": bpb, "lr": lr,
                         "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                         **{f"codebook/{k}": v for k, v in codebook.items()}})
            train_time, model_steps = 0.0, 0
        evaluate_now = done == cfg.max_steps or (cfg.eval_every and done % cfg.eval_every == 0)
        if evaluate_now:
            val = evaluate(model, val_split, segment_len=cfg.update_len, max_tokens=cfg.eval_tokens,
                           byte_level=byte_level, device=device)
            metrics_log({"step": done, **{f"val/{k}": v for k, v in val.items()}})
            (bar.write if progress else log)(f"step {done}: validation loss {val['loss']:.4f}, bpb {val['bpb']:.4f}")
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            is_best = bool(val) and evaluate_now and val["loss"] < best_loss
            best_loss = val["loss"] if is_best else best_loss
            train_state = {"optimizer": optimizer.state_dict(), "rng": _rng_state(), "step": done,
                           "best_loss": best_loss, "states": [None if s is None else s.to(device="cpu") for s in states]}
            ckpt.save_checkpoint(run_dir, done, model, train_state, {"data": cfg.data, "val": val},
                                 cfg.keep_last, is_best=is_best)
    bar.close()
    metrics_log.close()
    if not val:  # resumed a run that had already reached max_steps
        log(f"{run_dir} is already trained to step {start_step}; evaluating it")
        val = evaluate(model, val_split, segment_len=cfg.update_len, max_tokens=cfg.eval_tokens,
                       byte_level=byte_level, device=device)
    return val
