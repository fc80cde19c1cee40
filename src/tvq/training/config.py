"""Training run configuration: presets, config files and ``--set key=value`` overrides."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from tvq.config import DictConfig, TransformerVQConfig
from tvq.overrides import parse_value

OPTIMIZERS = ("adamw", "adafactor")
PARALLEL = ("ddp", "fsdp")
# keys a resumed run may change: how long it trains (max_steps), how a step is split over devices
# and micro-batches, and what is logged, saved and sampled; none changes the computed losses
RESUMABLE_KEYS = ("max_steps", "grad_accum", "parallel", "context_parallel", "dist_timeout", "log_every",
                  "save_every", "keep_last", "sample_tokens", "top_p")
MAX_DIST_TIMEOUT = 7 * 24 * 3600  # seconds; longer waits are a mistake (and overflow some backends)


@dataclass
class TrainConfig(DictConfig):
    """Everything a run needs besides the model config (``model``).

    Each optimizer step trains on one update segment of ``update_len`` tokens per sequence;
    a sequence of ``sequence_len`` tokens is ``sequence_len / update_len`` consecutive steps with
    the attention state carried (detached) from one to the next, as in the paper.
    ``batch_size`` is the global batch: under torchrun each of N ranks takes ``batch_size / N``
    rows, split into ``grad_accum`` micro-batches. With ``context_parallel = C`` > 1 the ranks form N / C
    data-parallel groups of C: each group takes ``batch_size C / N`` rows, and rank c of a group the c-th
    ``update_len / C`` tokens of every update segment of them (:mod:`tvq.parallel`).
    """

    model: TransformerVQConfig = field(default_factory=TransformerVQConfig)
    data: str = "stdlib"
    tokenizer: str = ""  # a SentencePiece .model; "" = the source's own (bytes; DIR/spm32k.model for PG-19)
    batch_size: int = 8
    grad_accum: int = 1
    sequence_len: int = 1024
    update_len: int = 256
    max_steps: int = 2000
    optimizer: str = "adamw"
    lr: float = 2e-3
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-9
    weight_decay: float = 2e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.1
    seed: int = 0
    log_every: int = 20
    eval_every: int = 0  # 0: only at the end
    eval_tokens: int = 32768  # validation tokens per evaluation during training (0: whole split)
    save_every: int = 500
    keep_last: int = 2
    sample_tokens: int = 200
    top_p: float = 0.9
    bf16: bool = True  # bfloat16 autocast where the device supports it (CUDA)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2, sharded)
    dist_timeout: int = 1800  # seconds a collective may wait for the other ranks before the job fails
    context_parallel: int = 1  # under torchrun: ranks sharing each update segment (each a chunk of it)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = TransformerVQConfig.from_dict(self.model, "model.")
        if not isinstance(self.model, TransformerVQConfig):
            raise ValueError(f"model must be a dict of model config keys, got {type(self.model).__name__}")
        self.check_types()
        self.validate()

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "sequence_len", "update_len", "max_steps", "log_every",
                     "save_every", "keep_last", "dist_timeout", "context_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warmup_steps", "eval_every", "eval_tokens", "sample_tokens", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.data.strip():
            raise ValueError("data is empty; name a source: stdlib, FILE, DIR, enwik8, pg19:DIR or imagenet64:DIR")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.sequence_len % self.update_len:
            raise ValueError(f"sequence_len {self.sequence_len} is not divisible by update_len "
                             f"{self.update_len}; pick update_len dividing it")
        if self.update_len % self.model.block_len:
            raise ValueError(f"update_len {self.update_len} is not divisible by model.block_len "
                             f"{self.model.block_len}")
        if self.context_parallel > 1:
            if self.update_len % self.context_parallel:
                raise ValueError(f"update_len {self.update_len} is not divisible by context_parallel "
                                 f"{self.context_parallel}")
            self.model.check_context_chunk(self.update_len // self.context_parallel)
        if self.dist_timeout > MAX_DIST_TIMEOUT:
            raise ValueError(f"dist_timeout must be at most {MAX_DIST_TIMEOUT} seconds, got {self.dist_timeout}")
        for name in ("lr", "eps", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def segments_per_sequence(self) -> int:
        return self.sequence_len // self.update_len



def _paper(model: dict, **train) -> dict:
    return dict(model=model, **train)


# docs/spec.md section 7. enwik8: 24 layers x 2 GAUs, ~190M parameters. The paper's runs used the official
# code's straight-through rule ("block").
PRESETS: dict[str, dict] = {
    "enwik8": _paper(
        dict(vocab_size=256, d_model=768, d_k=128, d_v=1536, n_head=1, n_layer=24, n_code=512,
             block_len=512, mem_len=512, dropout_sin=0.2, dropout_res=0.5, layerdrop=0.3,
             straight_through="block"),
        data="enwik8", batch_size=128, sequence_len=8192, update_len=2048, max_steps=125_000,
        optimizer="adamw", lr=4e-4, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=2e-4,
        warmup_steps=10_000, grad_clip=0.1, eval_every=5000, eval_tokens=0, save_every=1000,
        top_p=0.9,
    ),
    "pg19": _paper(
        dict(vocab_size=32000, d_model=2048, d_k=128, d_v=4096, n_head=1, n_layer=24, n_code=512,
             block_len=512, mem_len=512, dropout_sin=0.1, dropout_res=0.1, layerdrop=0.1,
             tie_embeddings=True, final_norm=True, logit_scale=0.005, straight_through="block"),
        data="pg19", batch_size=128, sequence_len=8192, update_len=2048, max_steps=500_000,
        optimizer="adafactor", lr=1e-2, warmup_steps=10_000, grad_clip=0.1, eval_every=10_000,
        eval_tokens=0, save_every=1000, top_p=0.8,
    ),
    "imagenet64": _paper(
        dict(vocab_size=256, d_model=2048, d_k=128, d_v=4096, n_head=1, n_layer=24, n_code=512,
             block_len=512, mem_len=512, dropout_sin=0.1, tie_embeddings=True, final_norm=True,
             logit_scale=0.005, straight_through="block"),
        data="imagenet64", batch_size=128, sequence_len=12288, update_len=1536, max_steps=500_000,
        optimizer="adafactor", lr=1e-2, warmup_steps=10_000, grad_clip=0.1, eval_every=10_000,
        eval_tokens=0, save_every=1000, top_p=0.999,
    ),
    # CPU presets: "small" trains in about five minutes on two cores; "tiny" is for tests.
    "small": _paper(
        dict(vocab_size=256, d_model=128, d_k=32, d_v=256, n_head=1, n_layer=2, n_code=64,
             block_len=64, mem_len=64),
        batch_size=8, sequence_len=1024, update_len=256, max_steps=2000, lr=2e-3, warmup_steps=100,
        eval_tokens=32768, save_every=500, log_every=20,
    ),
    "tiny": _paper(
        dict(vocab_size=256, d_model=32, d_k=8, d_v=64, n_head=1, n_layer=1, n_code=16,
             block_len=16, mem_len=16),
        batch_size=4, sequence_len=128, update_len=64, max_steps=20, lr=3e-3, warmup_steps=5,
        log_every=5, eval_tokens=2048, save_every=10, sample_tokens=32,
    ),
}
DEFAULT_PRESET = "small"


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return TrainConfig.from_dict(json.loads(json.dumps(PRESETS[name])))


def load_config_file(path: str | Path) -> TrainConfig:
    """A JSON file with TrainConfig keys (``model`` a dict of TransformerVQConfig keys)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist" if not path.exists() else
                         f"config file {path} is not a file")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"config file {path} cannot be read: {e.strerror}") from None
    try:
        return TrainConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config file {path}: {e}") from None


def config_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """The dotted keys (``lr``, ``model.d_model``) whose values differ between two configs."""
    da, db = a.to_dict(), b.to_dict()
    keys = [k for k in da if k != "model" and da[k] != db[k]]
    return keys + [f"model.{k}" for k in da["model"] if da["model"][k] != db["model"].get(k)]


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings; model fields are ``model.NAME`` (or just ``NAME`` if unambiguous)."""
    train_types = typing.get_type_hints(TrainConfig)
    model_types = typing.get_type_hints(TransformerVQConfig)
    train, model = cfg.to_dict(), cfg.model.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        name = key.removeprefix("model.")
        if key.startswith("model.") or (key not in train_types and key in model_types):
            if name not in model_types:
                raise ValueError(f"--set {key}: unknown model config key {name!r}")
            model[name] = parse_value(value, model_types[name], key)
        elif key in train_types and key != "model":
            train[key] = parse_value(value, train_types[key], key)
        else:
            raise ValueError(f"--set {key}: unknown config key")
    train["model"] = model
    return TrainConfig.from_dict(train)


def set_keys(overrides: list[str]) -> dict[str, str]:
    """``{key: value}`` of ``--set`` strings, model keys written ``model.NAME`` (the last wins)."""
    model_types = typing.get_type_hints(TransformerVQConfig)
    train_types = typing.get_type_hints(TrainConfig)
    keys = {}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.strip()
        if not key.startswith("model.") and key not in train_types and key in model_types:
            key = f"model.{key}"
        keys[key] = value
    return keys
