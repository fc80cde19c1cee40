"""The training loop: update segments with carried state, one codebook update per step."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tvq.data import ByteTokenizer, SentencePieceTokenizer, Split, load_corpus
from tvq.models.transformer_vq import TransformerVQ
from tvq.schedule import lr_at
from tvq.training import checkpoint as ckpt
from tvq.training.batches import SegmentSampler
from tvq.training.config import TrainConfig
from tvq.training.distributed import Cluster, cluster, select_rows
from tvq.training.evaluate import evaluate
from tvq.training.memory import check_fits
from tvq.training.rundir import (
    CONFIG_FILE, LOCK_FILE, METRICS_FILE, TOKENIZER_FILE, RunLock, check_new_run_dir, resolve_config, run_tokenizer,
    truncate_metrics, write_config)


class TrainingDiverged(ValueError):
    """The loss or the gradient norm of a step is not finite: training stops before that step's
    update, so no checkpoint ever holds non-finite weights."""


def make_optimizer(cfg: TrainConfig, model: TransformerVQ) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only, or Adafactor (torch's algorithm, in an
    implementation that also steps FSDP-sharded parameters: :mod:`tvq.training.adafactor`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adafactor":
        from tvq.training.adafactor import Adafactor  # imports DTensor (half a second): only when used

        return Adafactor(params, lr=cfg.lr)
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
    """Appends records to RUN_DIR/metrics.jsonl, and to TensorBoard when it is installed
    (nothing when not ``enabled``: the ranks other than 0)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path, self.enabled, self.tb = run_dir / METRICS_FILE, enabled, None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def create_run_dir(cfg: TrainConfig, run_dir: Path) -> list[Path]:
    """Create RUN_DIR for a new run and save its config; never touch an existing run. Returns
    what is the new run's to remove should its start fail: the config, the outputs a run writes
    that are not there yet, and the folders made."""
    check_new_run_dir(run_dir)
    made = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    outputs = [run_dir / name for name in (METRICS_FILE, TOKENIZER_FILE, ckpt.CKPT_DIR, "tensorboard", LOCK_FILE)]
    outputs = [p for p in outputs if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    return [run_dir / CONFIG_FILE, *outputs, *made]


def _remove_new_run(created: list[Path]) -> None:
    """Undo a new run whose start failed: the files it wrote, then the folders it made if left empty."""
    for path in created:
        if path.is_dir() and path.name in (ckpt.CKPT_DIR, "tensorboard"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, device: str | None = None,
          progress: bool = True, log=print) -> dict:
    """Train ``cfg`` into ``run_dir``; returns the final validation metrics.

    Under torchrun every rank calls this: data-parallel training over the process group (see
    :mod:`tvq.training.distributed`); only rank 0 logs, shows progress and writes the run.
    """
    run_dir = Path(run_dir)
    cfg = resolve_config(cfg, run_dir, resume)  # fail fast, before loading data
    with cluster(cfg.parallel, cfg.batch_size, cfg.grad_accum, cfg.dist_timeout, device, cfg.context_parallel) as cl:
        if not cl.is_main:
            log, progress = (lambda *a, **k: None), False
        micro_tokens = cfg.batch_size * cfg.update_len // (cl.world_size * cfg.grad_accum)
        check_fits(cfg.model, device=cl.device, what="this run", training=dict(
            tokens=micro_tokens, batch_tokens=cfg.batch_size * cfg.update_len, optimizer=cfg.optimizer,
            grad_checkpoint=cfg.model.grad_checkpoint))
        lock = RunLock(run_dir)
        try:
            if cl.is_main and resume:
                lock.acquire()
                for stale in ckpt.clean_stale_saves(run_dir):
                    log(f"removed {stale}, left by an interrupted save")
            return _train(cfg, run_dir, cl, resume, progress, log, lock)
        finally:
            lock.release()


def _seed_rank(cfg: TrainConfig, rank: int, step: int) -> None:
    """Seed the RNGs of rank > 0 from (seed, rank, step), so ranks draw different dropout masks."""
    seed = int(np.random.SeedSequence([cfg.seed, rank, step]).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@dataclass
class _Session:
    """What the steps of a run work with, made by :func:`_setup` before the first step."""

    model: TransformerVQ
    net: torch.nn.Module  # what a step calls: the model (FSDP shards it in place), or its DDP wrapper
    optimizer: torch.optim.Optimizer
    sampler: SegmentSampler
    val_split: Split
    byte_level: bool
    bytes_per_token: float  # of the training split: bits per token -> bits per byte
    amp: bool  # bfloat16 autocast
    start_step: int
    best_loss: float  # the lowest validation loss of a saved checkpoint
    rows: slice  # this rank's rows of the global batch
    micro: int  # rows per micro-batch
    states: list  # states[m]: the attention state carried into micro-batch m (None: empty)


def _train(cfg: TrainConfig, run_dir: Path, cl: Cluster, resume: bool, progress: bool, log, lock: RunLock) -> dict:
    created: list[Path] = []
    try:
        session = _setup(cfg, run_dir, cl, resume, log, lock, created)
    except BaseException:
        if created:  # a new run whose start failed leaves nothing behind
            lock.release()
            _remove_new_run(created)
        raise
    return _loop(cfg, run_dir, cl, progress, log, session)


def _setup(cfg: TrainConfig, run_dir: Path, cl: Cluster, resume: bool, log, lock: RunLock,
           created: list) -> _Session:
    """Everything before the first step: data, run directory, model, optimizer, resumed state."""
    device = cl.device
    torch.manual_seed(cfg.seed)  # the same on every rank: FSDP shards identically initialised weights
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    if resume and (run_dir / TOKENIZER_FILE).is_file():  # the run's own copy, even if the original is gone
        tokenizer = run_tokenizer(run_dir, cfg.model.vocab_size)
    else:
        tokenizer = SentencePieceTokenizer(cfg.tokenizer) if cfg.tokenizer else None
    corpus = cl.first_on_each_node(load_corpus, cfg.data, tokenizer=tokenizer)
    if corpus.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"data {cfg.data!r} has vocabulary {corpus.vocab_size} but the model has "
                         f"{cfg.model.vocab_size}; use --set model.vocab_size={corpus.vocab_size}")
    train_split, val_split = corpus.split("train"), corpus.split("validation")
    sampler = SegmentSampler(train_split, cfg)
    # everything checked: only now does the run directory appear (every rank has passed
    # check_new_run_dir, since all met in first_on_each_node's barrier)
    if cl.is_main and not resume:
        created += create_run_dir(cfg, run_dir)
        lock.acquire()
    if (cl.is_main and isinstance(corpus.tokenizer, SentencePieceTokenizer)
            and not (run_dir / TOKENIZER_FILE).exists()):
        shutil.copyfile(corpus.tokenizer.path, run_dir / TOKENIZER_FILE)
    byte_level = isinstance(corpus.tokenizer, ByteTokenizer)
    bytes_per_token = 1.0 if byte_level else train_split.n_bytes / len(train_split.tokens)

    model = TransformerVQ(cfg.model).to(device)
    n_params = model.num_parameters()
    last = ckpt.latest_checkpoint(run_dir) if resume else None
    if last is not None:
        ckpt.load_weights(model, last)  # before wrapping: FSDP shards the loaded weights
    amp = cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()
    net = cl.wrap(model, bf16=amp)
    optimizer = make_optimizer(cfg, model)
    start_step, best_loss = 0, math.inf
    rows = cl.rows(cfg.batch_size)  # this rank's rows of the global batch
    micro = (rows.stop - rows.start) // cfg.grad_accum
    states: list = [None] * cfg.grad_accum  # states[m]: the rows of micro-batch m
    if last is not None:
        ts = ckpt.load_train_state(last)
        start_step, best_loss = ts["step"], ts["best_loss"]
        rngs = ts["rng"]  # one per rank of the run that saved it
        try:
            cl.load_optimizer(model, optimizer, ts["optimizer"])
            if len(rngs) == cl.world_size:
                _set_rng_state(rngs[cl.rank])
            elif cl.is_main:
                _set_rng_state(rngs[0])
            else:  # resumed on another number of ranks: rank 0 continues, the others reseed
                _seed_rank(cfg, cl.rank, start_step)
            states = [select_rows(ts["states"], rows.start + m * micro, rows.start + (m + 1) * micro).to(device)
                      for m in range(cfg.grad_accum)]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise ckpt.CheckpointError(f"the train state of {last} does not fit this run ({type(e).__name__}: "
                                       f"{e}); it is damaged: delete {last.name} to resume from an earlier "
                                       "checkpoint") from None
        log(f"resuming {run_dir} from step {start_step}")
    else:
        if resume:
            log(f"--resume: no checkpoint in {run_dir} yet, starting from step 0")
        if cl.rank > 0:
            _seed_rank(cfg, cl.rank, 0)
    if cl.is_main and resume:
        truncate_metrics(run_dir, start_step)
    log(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.n_attn} "
        f"{'GAUs' if cfg.model.head_type == 'shga' else 'attention + MLP layers'}; "
        f"data: {cfg.data} ({len(train_split.tokens):,} training tokens)"
        + (f"; {cl.mode} over {cl.world_size} ranks" if cl.distributed else "")
        + (f", each update segment over {cl.cp}" if cl.cp > 1 else ""))

    return _Session(model, net, optimizer, sampler, val_split, byte_level, bytes_per_token, amp, start_step,
                    best_loss, rows, micro, states)


def _loop(cfg: TrainConfig, run_dir: Path, cl: Cluster, progress: bool, log, s: _Session) -> dict:
    """The training steps from ``s.start_step``, with evaluation, logging and checkpoints."""
    device = cl.device
    model, net, optimizer, sampler, rows, micro = s.model, s.net, s.optimizer, s.sampler, s.rows, s.micro
    states, best_loss = s.states, s.best_loss
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if s.amp and not cl.fsdp else contextlib.nullcontext

    def validate() -> dict:
        return evaluate(model, s.val_split, segment_len=cfg.update_len, max_tokens=cfg.eval_tokens,
                        byte_level=s.byte_level, device=device, rank=cl.rank, world_size=cl.world_size,
                        lockstep=cl.fsdp, context=cl.context)

    tokens_per_step = cfg.batch_size * cfg.update_len
    metrics_log = MetricsLog(run_dir, enabled=cl.is_main)
    bar = tqdm(total=cfg.max_steps, initial=s.start_step, disable=not progress, unit="step", dynamic_ncols=True)
    val = {}
    train_time, model_steps = 0.0, 0  # since the last log record; excludes evaluation and saving
    model.train()
    for step in range(s.start_step, cfg.max_steps):
        t0 = time.perf_counter()
        if sampler.is_sequence_start(step):
            states = [None] * cfg.grad_accum
        inputs, labels = (t[rows, cl.chunk(cfg.update_len)] for t in sampler.batch(step))
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = lm_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            mb = slice(m * micro, (m + 1) * micro)
            with cl.grad_sync(net, m == cfg.grad_accum - 1):  # gradients all-reduced on the last only
                with autocast():
                    out = net(inputs[mb].to(device), state=states[m], labels=labels[mb].to(device),
                              context=cl.context)
                (out.loss / cfg.grad_accum).backward()
            states[m] = out.state.detach()
            loss_sum = loss_sum + out.loss.detach().float() / cfg.grad_accum
            lm_sum = lm_sum + out.lm_loss.detach().float() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        # the step's one read-back (the divergence check needs the figures before the update); the losses are
        # the same on every rank, so all ranks stop together
        loss_sum, lm_sum, grad_norm = torch.cat([cl.mean(loss_sum, lm_sum), grad_norm.double()[None]]).tolist()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            last = ckpt.latest_checkpoint(run_dir)
            kept = f"the latest checkpoint, {last.name}, is intact" if last else "no checkpoint was saved yet"
            raise TrainingDiverged(f"step {step + 1}: the loss is {loss_sum} and the gradient norm {grad_norm}; "
                                   f"training stopped before this update ({kept}); lower lr, or check the data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        codebook = model.update_codebooks(all_reduce=cl.all_reduce())
        train_time += time.perf_counter() - t0
        model_steps += 1
        done = step + 1
        bpb = lm_sum / math.log(2) / s.bytes_per_token
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
            val = validate()
            metrics_log({"step": done, **{f"val/{k}": v for k, v in val.items()}})
            (bar.write if progress else log)(f"step {done}: validation loss {val['loss']:.4f}, bpb {val['bpb']:.4f}")
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            is_best = bool(val) and evaluate_now and val["loss"] < best_loss
            best_loss = val["loss"] if is_best else best_loss
            save(cl, run_dir, cfg, done, model, optimizer, states, best_loss, {"data": cfg.data, "val": val}, is_best)
    bar.close()
    metrics_log.close()
    if not val:  # resumed a run that had already reached max_steps
        log(f"{run_dir} is already trained to step {s.start_step}; evaluating it")
        val = validate()
    return val


def save(cl: Cluster, run_dir: Path, cfg: TrainConfig, step: int, model: TransformerVQ,
         optimizer: torch.optim.Optimizer, states: list, best_loss: float, meta: dict, is_best: bool) -> None:
    """Write a checkpoint from rank 0; every rank takes part in gathering it.

    The train state holds the full optimizer state keyed by parameter name, the RNG states of
    every rank, and the carried attention state as row blocks in global row order, so that any
    number of ranks and any ``grad_accum`` can resume it.
    """
    weights, optim_state = cl.full_state_dicts(model, optimizer)
    blocks = cl.gather_states(states)
    rngs = cl.gather_objects(_rng_state())
    if cl.is_main:
        train_state = {"optimizer": optim_state, "rng": rngs, "step": step, "best_loss": best_loss,
                       "states": blocks}
        ckpt.save_checkpoint(run_dir, step, model, train_state, meta, cfg.keep_last, is_best=is_best,
                             weights=weights)
