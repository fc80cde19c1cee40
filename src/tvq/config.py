"""Configuration of a Transformer-VQ model."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

ATTENTIONS = ("vq", "full")
ATTN_IMPLS = ("blockwise", "quadratic")
STRAIGHT_THROUGH = ("window", "block")
HEAD_TYPES = ("shga", "mha", "mqa")
CODEBOOK_INITS = ("random", "kmeans")


INT64_MAX = 2**63 - 1


class DictConfig:
    """Dict round trip for config dataclasses, rejecting unknown keys by name and values whose
    type does not match the field's annotation (checked generically, for every field)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, prefix: str = ""):
        """Build from a dict; nested config fields from nested dicts. ``prefix`` names the
        place of ``d`` in a larger config (``"model."``) in error messages."""
        if not isinstance(d, dict):
            raise ValueError(f"{prefix.rstrip('.') or 'the config'} must be a JSON object (dict) of config keys, "
                             f"got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(prefix + k for k in unknown)}")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in d.items():
            typ = hints.get(name)
            if isinstance(typ, type) and issubclass(typ, DictConfig):
                value = value if isinstance(value, typ) else typ.from_dict(value, f"{prefix}{name}.")
            else:
                check_type(f"{prefix}{name}", value, typ)
            values[name] = value
        return cls(**values)

    def check_types(self, prefix: str = "") -> None:
        """:func:`check_type` on every field (nested configs included)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, DictConfig):
                value.check_types(f"{prefix}{f.name}.")
            else:
                check_type(f"{prefix}{f.name}", value, hints.get(f.name))


def check_type(key: str, value, typ) -> None:
    """Raise ValueError unless ``value`` fits the annotation ``typ``: ints are ints (not bools)
    of 64 bits, floats finite numbers, bools bools, strs strs; ``X | None`` allows None; other
    annotations are left to the class's own validation."""
    options = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union \
        else (typ,)
    if value is None and type(None) in options:
        return
    checked = [t for t in options if t in (int, float, bool, str)]
    if len(checked) < len([t for t in options if t is not type(None)]):
        return  # an annotation this check does not know

    def fits(t) -> bool:
        if t is bool:
            return isinstance(value, bool)
        if t is int:
            return isinstance(value, int) and not isinstance(value, bool) and -INT64_MAX - 1 <= value <= INT64_MAX
        if t is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return isinstance(value, str)

    if not any(fits(t) for t in checked):
        names = " or ".join({int: "an integer (64-bit)", float: "a finite number", bool: "true or false",
                             str: "a string"}[t] for t in checked)
        raise ValueError(f"{key} must be {names}, got {value!r}")


@dataclass
class TransformerVQConfig(DictConfig):
    """Hyperparameters of :class:`tvq.TransformerVQ`.

    Widths are per head: each head has keys of width ``d_k`` and values of width ``d_v``,
    so the value/gate projections are ``n_head * d_v`` wide.

    ``n_layer`` counts *paper* layers. As in the paper, one layer is two gated attention
    units (GAUs) and no MLP, so the model has ``2 * n_layer`` GAUs (``n_layer=24`` is the
    paper's 48-GAU enwik8 model).

    ``head_type`` picks the layer, as in the official optimized code: ``"shga"`` (default) is
    the paper's model above; ``"mha"`` and ``"mqa"`` make each layer one attention sublayer
    and one MLP sublayer. Their attention has ``d_model // d_k`` query heads of width ``d_k``,
    values of width ``d_k``, no gate, and ``d_model // d_k`` key/value heads (``"mha"``) or a
    single one shared by all query heads (``"mqa"``: one codebook and one cache per layer);
    ``n_head`` and ``d_v`` are then unused. The MLP is ``relu(x W_1)^2 W_2`` of width ``d_ff``
    (0: the official ``4 * d_model`` for mha, ``5 * d_model`` for mqa).

    ``attention`` picks the model: ``"vq"`` is Transformer-VQ (quantized keys plus the
    compressive cache); ``"full"`` is the dense baseline, the same layers with causal softmax
    attention over unquantized keys and an unbounded key/value state.
    ``attn_impl`` picks how ``"vq"`` attention is computed; both give the same result:
    ``"blockwise"`` (default, linear time) or ``"quadratic"`` (the reference).
    ``block_len`` only affects speed and memory of the blockwise path, never the output, and
    no parameter shape depends on it.

    ``straight_through`` picks which quantized keys pass the straight-through gradient (the forward
    is the same either way, see docs/attention.md): ``"window"`` (default) those within ``mem_len``
    of the query, so gradients do not depend on ``block_len``; ``"block"`` the official code's rule,
    every key of the window of the query's block (position >= floor(t / L) L - M), and with
    ``grad_thru_cache=False`` only the block's own keys and values get a gradient. The paper's
    runs used ``"block"``.
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
    straight_through: str = "window"
    head_type: str = "shga"
    d_ff: int = 0
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
    cache_bias: bool = False  # a learned per-head offset added to the cache's log-count scores (not in the paper; none without agg_cache)
    cache_bias_init: float = 0.0  # its initial value (negative: the model starts nearer its window-only self)
    # not in the paper: for the first cache_warmup optimizer steps of training (counted by update_codebooks in
    # train mode, saved with the model) attention ignores the cache exactly as agg_cache=False does, in training
    # and eval alike; the cache is still built, and used from then on. 0: off (the paper)
    cache_warmup: int = 0

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
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"config.head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if not isinstance(self.d_ff, int) or isinstance(self.d_ff, bool) or self.d_ff < 0:
            raise ValueError(f"config.d_ff must be an int >= 0 (0: the head type's default), got {self.d_ff!r}")
        if self.head_type == "shga" and self.d_ff:
            raise ValueError(f"config.d_ff={self.d_ff} needs head_type 'mha' or 'mqa' (shga layers have no MLP)")
        if self.head_type != "shga" and self.d_model % self.d_k:
            raise ValueError(f"config.head_type={self.head_type!r} needs d_model divisible by d_k (query heads "
                             f"of width d_k), got d_model={self.d_model}, d_k={self.d_k}")
        for name in ("agg_cache", "grad_thru_cache", "tie_embeddings", "final_norm", "grad_checkpoint", "cache_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be a bool, got {getattr(self, name)!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"config.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.straight_through not in STRAIGHT_THROUGH:
            raise ValueError(f"config.straight_through must be one of {STRAIGHT_THROUGH}, "
                             f"got {self.straight_through!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"config.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        for name in ("dropout_emb", "dropout_sin", "dropout_res", "layerdrop"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ValueError(f"config.{name} must be a probability in [0, 1), got {p!r}")
        if (not isinstance(self.cache_bias_init, (int, float)) or isinstance(self.cache_bias_init, bool)
                or not math.isfinite(self.cache_bias_init)):
            raise ValueError(f"config.cache_bias_init must be a finite number, got {self.cache_bias_init!r}")
        if not isinstance(self.cache_warmup, int) or isinstance(self.cache_warmup, bool) or self.cache_warmup < 0:
            raise ValueError(f"config.cache_warmup must be an int >= 0 (0: off), got {self.cache_warmup!r}")
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
    def n_attn(self) -> int:
        """Number of attention sublayers, each with its own state: two GAUs per layer (shga), or one
        attention sublayer per layer (mha, mqa), each followed by an MLP."""
        return 2 * self.n_layer if self.head_type == "shga" else self.n_layer

    @property
    def gated(self) -> bool:
        """Whether the attention sublayers are the paper's gated units (shga): SiLU values, a SiLU gate on
        the output and a pre-norm with gain and bias. mha/mqa have none of the three."""
        return self.head_type == "shga"

    @property
    def n_q_head(self) -> int:
        """Query heads of an attention sublayer."""
        return self.n_head if self.gated else self.d_model // self.d_k

    @property
    def n_kv_head(self) -> int:
        """Key/value heads of an attention sublayer: one codebook and one cache each."""
        return {"shga": self.n_head, "mha": self.n_q_head, "mqa": 1}[self.head_type]

    @property
    def head_d_v(self) -> int:
        """Value width per head."""
        return self.d_v if self.gated else self.d_k

    @property
    def ff_width(self) -> int:
        """Hidden width of the MLP sublayers (mha, mqa)."""
        return self.d_ff or {"shga": 0, "mha": 4, "mqa": 5}[self.head_type] * self.d_model

    def check_context_chunk(self, chunk_len: int) -> None:
        """ValueError unless one rank's chunk of ``chunk_len`` tokens of a segment split over ranks (context
        parallelism, :mod:`tvq.parallel`) can be computed exactly."""
        if self.attention != "vq":
            raise ValueError(f"context parallelism needs attention='vq', not {self.attention!r}")
        if chunk_len < self.mem_len:
            raise ValueError(f"context parallelism: a chunk of {chunk_len} tokens per rank is shorter than "
                             f"mem_len = {self.mem_len}; use fewer ranks or longer segments")
        if self.straight_through == "block" and chunk_len % self.block_len:
            raise ValueError(f"context parallelism with straight_through='block': a chunk of {chunk_len} tokens "
                             f"per rank is not a multiple of block_len = {self.block_len}")

    def replace(self, **changes) -> "TransformerVQConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

