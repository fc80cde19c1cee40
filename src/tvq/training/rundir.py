"""The files of a run directory besides its checkpoints, read and written safely, and the config
a run trains with (:func:`resolve_config`, the one place for the rules of a resumed run).

``RUN/config.json`` (the run's TrainConfig), ``RUN/metrics.jsonl`` (one JSON record a line),
``RUN/tokenizer.model`` (a SentencePiece run's vocabulary) and ``RUN/.lock`` (held by the process
training the run). Every reader names the file and the problem when a file is missing or damaged.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from tvq.files import write_text_atomic
from tvq.training.config import (DEFAULT_PRESET, RESUMABLE_KEYS, TrainConfig, apply_overrides, config_differences,
                                 load_config_file, preset, set_keys)
from tvq.usage import UsageError, check_creatable

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TOKENIZER_FILE = "tokenizer.model"  # a run's SentencePiece model, kept beside its checkpoints
LOCK_FILE = ".lock"
BYTE_VOCAB = 256


def absolute_source(source: str) -> str:
    """A data source that names the same data from any working folder: ``FILE``, ``DIR`` and the
    folder of ``pg19:DIR`` / ``imagenet64:DIR`` made absolute; names (stdlib, enwik8) unchanged."""
    kind, colon, folder = source.partition(":")
    if colon and kind in ("pg19", "imagenet64") and folder:
        return f"{kind}:{os.path.abspath(os.path.expanduser(folder))}"
    path = Path(source).expanduser()
    return os.path.abspath(path) if source not in ("stdlib", "enwik8") and path.exists() else source


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    write_text_atomic(run_dir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))


def read_config(run_dir: str | Path) -> TrainConfig:
    """RUN/config.json, with a clear error when it is missing or damaged."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; is {run_dir} a tvq run directory?")
    return load_config_file(path)


def read_metrics(run_dir: str | Path) -> tuple[list[dict], int]:
    """The records of RUN/metrics.jsonl and how many lines were damaged (skipped): not JSON, not
    an object, or without an integer ``step``."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; is {run_dir} a tvq run directory that has trained?")
    records, damaged = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            damaged += 1
    return records, damaged


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` (a resumed run's checkpoint): the records a
    killed run logged after its last checkpoint are logged again, so the file reads as one run."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    records, _ = read_metrics(run_dir)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))


def run_tokenizer(run_dir: str | Path, vocab_size: int | None = None):
    """The SentencePiece tokenizer a run was trained with, or None for a byte-level run.

    ``vocab_size`` (the model's) other than 256 means the run needs its tokenizer.model: a clear
    error when it is missing, or when it does not match the model."""
    from tvq.data import SentencePieceTokenizer

    path = Path(run_dir) / TOKENIZER_FILE
    if not path.is_file():
        if vocab_size is not None and vocab_size != BYTE_VOCAB:
            raise ValueError(f"{path} is missing: the run's model has a {vocab_size}-piece vocabulary, so it "
                             f"was trained with a SentencePiece model; copy that .model file to {path}")
        return None
    tokenizer = SentencePieceTokenizer(path)
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{path} has {tokenizer.vocab_size} pieces but the run's model has a {vocab_size}-token "
                         "vocabulary; it is not the run's tokenizer")
    return tokenizer


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse a run directory that is a file, or a missing one to resume."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file; give a folder for the run")
    if resume and not run_dir.is_dir():
        raise ValueError(f"--resume: {run_dir} does not exist; start a new run without --resume")


def resume_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The config saved in RUN_DIR, with the keys a resumed run may change (``RESUMABLE_KEYS``:
    ``max_steps`` to extend it, ``grad_accum``, ``parallel``, ...) taken from ``cfg``. Any other
    key of ``cfg`` that differs from the run's is refused by name: it would be silently ignored."""
    check_run_dir(run_dir, resume=True)
    if not (run_dir / CONFIG_FILE).exists():
        raise ValueError(f"--resume: {run_dir} has no {CONFIG_FILE}; start a new run instead")
    prior = read_config(run_dir)
    wanted = cfg.to_dict()
    wanted["data"] = absolute_source(cfg.data) if cfg.data != prior.data else cfg.data
    if cfg.tokenizer and cfg.tokenizer != prior.tokenizer:
        wanted["tokenizer"] = os.path.abspath(cfg.tokenizer)
    changed = [k for k in config_differences(prior, TrainConfig.from_dict(wanted)) if k not in RESUMABLE_KEYS]
    if changed:
        key = changed[0]
        get = (lambda c: getattr(c.model, key[6:])) if key.startswith("model.") else (lambda c: getattr(c, key))
        raise ValueError(f"--resume: {key} is {get(prior)!r} in the run but {get(cfg)!r} was given; a resumed "
                         f"run keeps its config except {', '.join(RESUMABLE_KEYS)}; start a new run to change it")
    return TrainConfig.from_dict(dict(prior.to_dict(), **{key: getattr(cfg, key) for key in RESUMABLE_KEYS}))


def new_run_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its data source and tokenizer as paths any later command can use, from any folder."""
    tokenizer = os.path.abspath(os.path.expanduser(cfg.tokenizer)) if cfg.tokenizer else ""
    return TrainConfig.from_dict(dict(cfg.to_dict(), data=absolute_source(cfg.data), tokenizer=tokenizer))


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse to start a new run where one already is, or where no folder can be."""
    from tvq.training.checkpoint import latest_checkpoint  # imports torch

    check_run_dir(run_dir, resume=False)
    if (run_dir / CONFIG_FILE).exists() or latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")


def resolve_config(cfg: TrainConfig, run_dir: Path, resume: bool) -> TrainConfig:
    """The config a run in ``run_dir`` trains with when ``cfg`` is asked for: resuming, the run's own
    (:func:`resume_config`); else ``cfg`` with absolute paths, in a folder that holds no run yet."""
    if resume:
        return resume_config(cfg, run_dir)
    check_new_run_dir(run_dir)
    return new_run_config(cfg)


def config_from_options(*, preset_name: str | None = None, config_file: str | None = None,
                        overrides: Sequence[str] = (), data: str | None = None, max_steps: int | None = None,
                        out: str | None = None, resume: bool = False) -> tuple[TrainConfig, Path]:
    """The config and run directory that ``tvq train``'s options ask for, resolved
    (:func:`resolve_config`): every problem is refused here, before anything is written or
    trained. Without ``out`` the run goes to ``runs/NAME-TIME``; resuming without a preset or
    config file starts from the run's own config."""
    if resume and not out:
        raise UsageError("--resume needs --out RUN_DIR, the run to continue")
    if out is not None and not out.strip():
        raise UsageError("--out: empty path")
    name = preset_name or (Path(config_file).stem if config_file else DEFAULT_PRESET)
    run_dir = Path(out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_dir(run_dir, resume)
    if resume and not os.access(run_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--resume: {run_dir} is not writable; a resumed run writes checkpoints there")
    if not resume:
        check_creatable(run_dir, "--out")
    keys = set_keys(overrides)
    for flag, key, value in (("--max-steps", "max_steps", max_steps), ("--data", "data", data)):
        if value is not None and key in keys and keys[key].strip() != str(value):
            raise UsageError(f"{flag} {value} and --set {key}={keys[key]} disagree; give one of them")
    if resume and not (preset_name or config_file):  # the run's own config: --set may change only some keys
        cfg = read_config(run_dir)
    else:
        cfg = load_config_file(config_file) if config_file else preset(preset_name or DEFAULT_PRESET)
    overrides = list(overrides)
    if data is not None:
        overrides.append(f"data={data}")
    if max_steps is not None:
        overrides.append(f"max_steps={max_steps}")
    return resolve_config(apply_overrides(cfg, overrides), run_dir, resume), run_dir


class RunLock:
    """An exclusive lock on RUN/.lock, held while a process trains the run: a second trainer of the
    same run is refused, and partial saves found while holding it are stale (no one else writes)."""

    def __init__(self, run_dir: Path):
        self.path, self.fd = run_dir / LOCK_FILE, None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise ValueError(f"another process is training {self.path.parent} (it holds {self.path}); "
                             "wait for it to finish or choose another --out") from None
        return self

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None
