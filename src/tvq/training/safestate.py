"""The training state on disk without pickle: tensors in safetensors, everything else in JSON.

A train state is a nested structure of dicts, lists, tuples, numbers, strings, tensors, numpy
arrays and the attention state (:class:`TransformerVQState` of :class:`LayerState`). ``save``
writes its tensors to ``NAME.safetensors`` and the structure, with each tensor replaced by its
name, to ``NAME.json``; ``load`` rebuilds it exactly (bit for bit: floats round-trip through
their ``repr``). Loading executes no code from the files: only these types can come back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tvq.state import LayerState, TransformerVQState

_STATES = {"LayerState": LayerState, "TransformerVQState": TransformerVQState}


def save(obj, path_stem: Path) -> list[Path]:
    """Write ``obj`` to ``path_stem.safetensors`` and ``path_stem.json``; returns both paths."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set = set()

    def enc(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            if t.numel() and t.untyped_storage().data_ptr() in storages:  # safetensors refuses shared memory
                t = t.clone()
            if t.numel():
                storages.add(t.untyped_storage().data_ptr())
            name = f"t{len(tensors)}"
            tensors[name] = t
            return {"tensor": name}
        if isinstance(x, np.ndarray):
            return {"ndarray": {"dtype": x.dtype.str, "shape": list(x.shape), "data": x.ravel().tolist()}}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, tuple):
            return {"tuple": [enc(v) for v in x]}
        if isinstance(x, dict):
            return {"dict": [[enc(k), enc(v)] for k, v in x.items()]}
        if type(x).__name__ in _STATES and isinstance(x, _STATES[type(x).__name__]):
            return {type(x).__name__: {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)}}
        raise TypeError(f"cannot store a {type(x).__name__} in a train state")

    structure = enc(obj)
    st, js = path_stem.with_suffix(".safetensors"), path_stem.with_suffix(".json")
    save_file(tensors, str(st))
    js.write_text(json.dumps({"format": "tvq-train-state-1", "state": structure}))
    return [st, js]


def load(path_stem: Path):
    """The structure :func:`save` wrote; ValueError naming the file when it is damaged."""
    st, js = path_stem.with_suffix(".safetensors"), path_stem.with_suffix(".json")
    try:
        doc = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{js} is corrupt ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "tvq-train-state-1" or "state" not in doc:
        raise ValueError(f"{js} is not a tvq train state")
    try:
        tensors = load_file(str(st))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise ValueError(f"{st} is truncated or corrupt ({e})") from None

    def dec(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict) and len(x) == 1:
            (tag, v), = x.items()
            if tag == "tensor" and isinstance(v, str) and v in tensors:
                return tensors[v]
            if tag == "ndarray" and isinstance(v, dict):
                return np.array(v["data"], dtype=np.dtype(v["dtype"])).reshape(v["shape"])
            if tag == "tuple" and isinstance(v, list):
                return tuple(dec(e) for e in v)
            if tag == "dict" and isinstance(v, list):
                return {dec(k): dec(e) for k, e in v}
            if tag in _STATES and isinstance(v, dict):
                return _STATES[tag](**{k: dec(e) for k, e in v.items()})
        raise ValueError(f"unexpected entry {str(x)[:60]}")

    try:
        return dec(doc["state"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{js} is corrupt: {e}") from None
