"""Configuration of a Transformer-VQ model."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

ATTENTIONS = ("vq", "full")
ATTN_IMPLS = ("blockwise", "quadratic")


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
        for name in ("agg_cache", "grad_thru_cache", "tie_embeddings", "final_norm", "grad_checkpoint"):
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

