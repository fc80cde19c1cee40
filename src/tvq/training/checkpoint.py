"""Checkpoints: one directory per step, written atomically.

``RUN/checkpoints/step_00000100/`` holds ``model.safetensors`` (weights and codebooks),
``train_state.pt`` (optimizer, RNG states, data position, the carried attention state) and
``meta.json``, whatever the number of ranks that trained it (see ``trainer.save``). A checkpoint is first written to a temporary directory and renamed into place,
so an interrupted save never damages an earlier checkpoint. ``best`` is a copy of the
checkpoint with the lowest validation loss.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tvq.config import TransformerVQConfig
from tvq.models.transformer_vq import TransformerVQ

CKPT_DIR = "checkpoints"
BEST = "best"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not match the config."""


def _write_atomic_dir(final: Path, write) -> None:
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: Path, step: int, model: TransformerVQ, train_state: dict, meta: dict,
                    keep_last: int, is_best: bool = False, weights: dict | None = None) -> Path:
    """Write checkpoint ``step``: ``weights`` (default ``model.state_dict()``; a full state dict
    gathered from the ranks under FSDP), ``train_state`` and ``meta`` plus the model config."""
    ckpt_root = Path(run_dir) / CKPT_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in (weights or model.state_dict()).items()}
    meta = dict(meta, step=step, config=model.config.to_dict())

    def write(d: Path) -> None:
        save_file(weights, str(d / "model.safetensors"))
        torch.save(train_state, d / "train_state.pt")
        (d / "meta.json").write_text(json.dumps(meta, indent=2))

    final = ckpt_root / f"step_{step:08d}"
    _write_atomic_dir(final, write)
    if is_best:
        _write_atomic_dir(ckpt_root / BEST, lambda d: [shutil.copy2(f, d / f.name) for f in final.iterdir()])
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted(p for p in (Path(run_dir) / CKPT_DIR).glob("step_*") if p.is_dir())
    return steps[-1] if steps else None


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """``latest``, ``best``, or a step number, inside RUN_DIR/checkpoints."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if which == "latest":
        path = latest_checkpoint(run_dir)
    elif which == BEST:
        path = run_dir / CKPT_DIR / BEST
    else:
        path = run_dir / CKPT_DIR / f"step_{int(which):08d}"
    if path is None or not path.is_dir():
        raise CheckpointError(f"no {which} checkpoint in {run_dir / CKPT_DIR}; train first or pick another run")
    return path


def load_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no meta.json: an incomplete checkpoint") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{ckpt / 'meta.json'} is corrupt") from None


def load_model(ckpt: Path, map_location: str | torch.device = "cpu") -> tuple[TransformerVQ, dict]:
    """The model saved in a checkpoint directory, and its meta data."""
    meta = load_meta(ckpt)
    try:
        config = TransformerVQConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / 'meta.json'} has no valid model config: {e}") from None
    model = TransformerVQ(config)
    load_weights(model, ckpt)
    return model.to(map_location), meta


def load_weights(model: TransformerVQ, ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); use another checkpoint") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise CheckpointError(f"{path} does not match the model config: {first[0].strip()}") from None


def load_train_state(ckpt: Path) -> dict:
    """The training state, memory-mapped: each rank reads only the state rows it needs."""
    path = ckpt / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # torch.load raises many types on a damaged file
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); use another checkpoint") from None
