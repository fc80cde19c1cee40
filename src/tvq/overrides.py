"""``--set KEY=VALUE`` strings typed as the config fields they set: for ``tvq train`` (through
:mod:`tvq.training.config`), ``tvq bench`` and ``tvq recall``."""

from __future__ import annotations

import typing

from tvq.config import TransformerVQConfig, check_type


def parse_value(value: str, typ, key: str):
    """The value of ``--set key=value`` for a field annotated ``typ`` (``X | None``: ``none`` or an X)."""
    options = [t for t in typing.get_args(typ) if t is not type(None)]
    if options and len(options) < len(typing.get_args(typ)):  # an optional field
        if value.lower() in ("none", "null"):
            return None
        typ = options[0]
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={value}: expected true or false")
    try:
        if typ is int:  # 1e6 and 1_000_000 are integers too
            number = float(value) if "e" in value.lower() and not value.lower().startswith("0x") else None
            parsed = int(number) if number is not None and number.is_integer() else int(value)
        else:
            parsed = typ(value)
    except (ValueError, OverflowError):
        raise ValueError(f"--set {key}={value}: expected a value of type {typ.__name__}") from None
    check_type(f"--set {key}", parsed, typ)
    return parsed


def parse_model_overrides(items: list[str], flag: str = "--set") -> dict:
    """``model.NAME=VALUE`` (or ``NAME=VALUE``) strings -> {field: value} of TransformerVQConfig fields,
    each typed as the field is annotated; ValueError names the first bad item."""
    types = typing.get_type_hints(TransformerVQConfig)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        name = key.removeprefix("model.")
        if not sep:
            raise ValueError(f"{flag} expects model.KEY=VALUE, got {item!r}")
        if name not in types:
            raise ValueError(f"{flag} {item!r}: unknown model config key {name!r}")
        out[name] = parse_value(value, types[name], key)
    return out
