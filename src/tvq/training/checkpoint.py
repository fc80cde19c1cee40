"""Checkpoints: one directory per step, written atomically.

``RUN/checkpoints/step_00000100/`` holds ``model.safetensors`` (weights and codebooks),
``train_state.safetensors`` + ``train_state.json`` (optimizer, RNG states, data position, the
carried attention state: tensors and JSON, so loading runs no code, see :mod:`safestate`) and
``meta.json``, whatever the number of ranks that trained it (see ``trainer.save``). A checkpoint
is first written to a temporary directory and renamed into place, so an interrupted save never
damages an earlier checkpoint. The best checkpoint (lowest validation loss) is copied to
``best-step_XXXXXXXX`` the same way; older best copies are removed only once the new one is in
place, so a kill at any moment leaves one (``find_checkpoint(run, "best")`` picks the newest).
Checkpoints of older tvq versions (``train_state.pt``, a pickle) are read with
``torch.load(weights_only=True)`` and only the types such a file holds allowed.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tvq.config import TransformerVQConfig
from tvq.files import write_dir_atomic
from tvq.models.transformer_vq import TransformerVQ
from tvq.state import LayerState, TransformerVQState
from tvq.training import safestate

CKPT_DIR = "checkpoints"
BEST = "best"
BEST_PREFIX = "best-"  # best-step_XXXXXXXX: a copy of the best checkpoint
TRAIN_STATE = "train_state"  # train_state.safetensors + train_state.json
LEGACY_TRAIN_STATE = "train_state.pt"
TEMP_PREFIXES = (".tmp-", ".old-")  # partial saves; removed by clean_stale_saves


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not match the config."""


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
        safestate.save(train_state, d / TRAIN_STATE)
        (d / "meta.json").write_text(json.dumps(meta, indent=2))

    final = ckpt_root / f"step_{step:08d}"
    write_dir_atomic(final, write)
    if is_best:
        best = ckpt_root / f"{BEST_PREFIX}{final.name}"
        write_dir_atomic(best, lambda d: [shutil.copy2(f, d / f.name) for f in final.iterdir()])
        for old in _best_copies(ckpt_root) + [ckpt_root / BEST]:  # only now: the new one is in place
            if old != best and old.is_dir():
                shutil.rmtree(old)
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old)
    return final


def _best_copies(ckpt_root: Path) -> list[Path]:
    return sorted(p for p in ckpt_root.glob(f"{BEST_PREFIX}step_*") if p.is_dir())


def clean_stale_saves(run_dir: Path) -> list[Path]:
    """Remove the partial saves (``.tmp-*``, ``.old-*``) a killed save left in RUN/checkpoints.
    Call it only while holding the run's lock (:func:`tvq.training.rundir.lock_run`): then no
    other live process can be writing them. Returns what was removed."""
    root = Path(run_dir) / CKPT_DIR
    stale = [p for p in root.iterdir() if p.name.startswith(TEMP_PREFIXES)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return stale


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = sorted(p for p in (Path(run_dir) / CKPT_DIR).glob("step_*") if p.is_dir())
    return steps[-1] if steps else None


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """``latest``, ``best``, or a step number, inside RUN_DIR/checkpoints."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist" if not run_dir.exists()
                              else f"{run_dir} is not a run directory but a file")
    if which == "latest":
        path = latest_checkpoint(run_dir)
    elif which == BEST:
        copies = _best_copies(run_dir / CKPT_DIR)
        path = copies[-1] if copies else run_dir / CKPT_DIR / BEST  # BEST: the layout of older versions
    elif which.isdigit():
        path = run_dir / CKPT_DIR / f"step_{int(which):08d}"
    else:
        raise CheckpointError(f"checkpoint {which!r}: expected latest, best or a step number")
    if path is None or not path.is_dir():
        raise CheckpointError(f"no {which} checkpoint in {run_dir / CKPT_DIR}; train first or pick another run")
    return path


def load_meta(ckpt: Path) -> dict:
    """meta.json of a checkpoint, checked: ``step`` a non-negative int, ``config`` a dict, ``data``
    (when present) a string."""
    path = ckpt / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no meta.json: an incomplete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is corrupt (not JSON); use another checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt: not a JSON object; use another checkpoint")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} is corrupt: step must be a non-negative integer, got {step!r}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} is corrupt: it has no model config")
    if not isinstance(meta.get("data", ""), str):
        raise CheckpointError(f"{path} is corrupt: data must be a string, got {meta['data']!r}")
    return meta


def load_model(ckpt: Path, map_location: str | torch.device = "cpu") -> tuple[TransformerVQ, dict]:
    """The model saved in a checkpoint directory, and its meta data."""
    meta = load_meta(ckpt)
    try:
        config = TransformerVQConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / 'meta.json'} has no valid model config: {e}") from None
    from tvq.training.memory import check_fits

    check_fits(config, device=torch.device(map_location), what=f"the model of {ckpt}")
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
    """The training state of a checkpoint, checked to hold what a resume needs."""
    stem = ckpt / TRAIN_STATE
    if stem.with_suffix(".json").is_file():
        try:
            ts = safestate.load(stem)
        except FileNotFoundError as e:
            raise CheckpointError(f"{e.filename} is missing; use another checkpoint") from None
        except ValueError as e:
            raise CheckpointError(f"{e}; use another checkpoint") from None
    elif (ckpt / LEGACY_TRAIN_STATE).is_file():
        ts = _load_legacy_train_state(ckpt / LEGACY_TRAIN_STATE)
    else:
        raise CheckpointError(f"{stem}.json is missing: an incomplete checkpoint; use another checkpoint")
    where = stem.with_suffix(".json") if stem.with_suffix(".json").is_file() else ckpt / LEGACY_TRAIN_STATE
    shapes = {"optimizer": dict, "rng": list, "states": list}
    for key, typ in shapes.items():
        if not isinstance(ts.get(key) if isinstance(ts, dict) else None, typ):
            raise CheckpointError(f"{where} is corrupt: no valid {key!r}; use another checkpoint")
    if not isinstance(ts.get("step"), int) or ts["step"] < 0 or not isinstance(ts.get("best_loss"), float):
        raise CheckpointError(f"{where} is corrupt: no valid step or best_loss; use another checkpoint")
    if not ts["rng"] or not all(isinstance(s, TransformerVQState) for s in ts["states"]):
        raise CheckpointError(f"{where} is corrupt: no RNG or attention state; use another checkpoint")
    return ts


def _load_legacy_train_state(path: Path) -> dict:
    """A ``train_state.pt`` of an older tvq: loaded with ``weights_only=True``, allowing only the
    types it holds (tvq's state dataclasses and numpy's RNG state array)."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / 1
    allowed = [TransformerVQState, LayerState, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
               core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on a damaged or disallowed file
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} (an older tvq checkpoint) cannot be loaded safely ({reason}); "
                              "resume it with the tvq version that wrote it, or evaluate/sample its "
                              "weights, which this version reads") from None
