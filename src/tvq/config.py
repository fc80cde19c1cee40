"""Configuration of a Transformer-VQ model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ATTENTIONS = ("vq", "full")
ATTN_IMPLS = ("blockwise", "quadratic")
CODEBOOK_INITS = ("random", "kmeans")


class DictConfig:
    """Dict round trip for config dataclasses, rejecting unknown keys by name."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__} must be built from a dict of keys, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass
class TransformerVQConfig(DictConfig):
    """Hyperparameters of :class:`tvq.TransformerVQ`.

    Widths are per head: each head has keys of width ``d_k`` and values of width ``d_v``,
    so the value/gate projections are ``n_head * d_v`` wide.

    ``n_layer`` counts *paper* layers. As in the paper, one layer is two gated attention
    units (GAUs) and no MLP, so the model has ``2 * n_layer`` GAUs (``n_layer=24`` is the
    paper's 48-GAU enwik8 model).

    ``attention`` picks the model: ``"vq"`` is Transformer-VQ (quantized keys plus the
    compressive cache); ``"full"`` is the dense baseline, the same layers with causal softmax
    attention over unquantized keys and an unbounded key/value state.
    ``attn_impl`` picks how ``"vq"`` attention is computed; both give the same result:
    ``"blockwise"`` (default, linear time) or ``"quadratic"`` (the reference).
    ``block_len`` only affects speed and memory of the blockwise path, never the output, and
    no parameter shape depends on it.
    """

    vocab_size: int = 256
    d_model: int = 256
    d_k: int = 64
    d_v: int = 512
    n_head: int = 1
    n_layer: int = 2
    n_code: int = 256
    block_len: int = 128
    mem_len: int = 128
    agg_cache: bool = True
    grad_thru_cache: bool = True
    attention: str = "vq"
    attn_impl: str = "blockwise"
    commit_weight: float = 1e-4
    codebook_decay: float = 0.99
    dropout_emb: float = 0.0
    dropout_sin: float = 0.0
    dropout_res: float = 0.0
    layerdrop: float = 0.0
    rel_pos_base: float = 1e5
    tie_embeddings: bool = False
    final_norm: bool = False
    logit_scale: float = 1.0
    norm_eps: float = 1e-6
    grad_checkpoint: bool = False  # training: recompute each GAU in backward instead of keeping its activations
    # codebook tools, not in the paper (off by default; see tvq.layers.vq.VectorQuantizer.apply_update):
    codebook_init: str = "random"  # "kmeans": k-means over the keys of the first training step
    codebook_revive: float = 0.0  # > 0: re-seed codes whose EMA count falls below this after each update
    cache_bias: bool = False  # a learned per-head offset added to the cache's log-count scores (not in the paper)
    cache_bias_init: float = 0.0  # its initial value (negative: the model starts nearer its window-only self)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that makes the config impossible."""
        for name in ("vocab_size", "d_model", "d_k", "d_v", "n_head", "n_layer", "n_code",
                     "block_len", "mem_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"config.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"config.{name} must be >= 1, got {value}")
        for name in ("agg_cache", "grad_thru_cache", "tie_embeddings", "final_norm", "grad_checkpoint", "cache_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be a bool, got {getattr(self, name)!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"config.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"config.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        for name in ("dropout_emb", "dropout_sin", "dropout_res", "layerdrop"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ValueError(f"config.{name} must be a probability in [0, 1), got {p!r}")
        if (not isinstance(self.cache_bias_init, (int, float)) or isinstance(self.cache_bias_init, bool)
                or not math.isfinite(self.cache_bias_init)):
            raise ValueError(f"config.cache_bias_init must be a finite number, got {self.cache_bias_init!r}")
        if self.codebook_init not in CODEBOOK_INITS:
            raise ValueError(f"config.codebook_init must be one of {CODEBOOK_INITS}, got {self.codebook_init!r}")
        if (not isinstance(self.codebook_revive, (int, float)) or isinstance(self.codebook_revive, bool)
                or not 0.0 <= self.codebook_revive < math.inf):
            raise ValueError(f"config.codebook_revive must be a number >= 0, got {self.codebook_revive!r}")
        if not isinstance(self.codebook_decay, (int, float)) or not 0.0 <= self.codebook_decay < 1.0:
            raise ValueError(f"config.codebook_decay must be in [0, 1), got {self.codebook_decay!r}")
        for name in ("commit_weight",):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"config.{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("rel_pos_base", "logit_scale", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"config.{name} must be a number > 0, got {value!r}")

    @property
    def n_gau(self) -> int:
        """Number of gated attention units (two per paper layer)."""
        return 2 * self.n_layer

    def replace(self, **changes) -> "TransformerVQConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

