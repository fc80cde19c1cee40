"""tvq: Transformer-VQ in PyTorch, softmax attention in linear time via vector-quantized keys."""

import importlib

from tvq.config import TransformerVQConfig

__all__ = ["TransformerVQConfig", "TransformerVQ", "TransformerVQOutput", "LayerState", "TransformerVQState"]
__version__ = "0.1.0"

# imported on first use, so that the ``tvq`` command answers --help without loading torch
_LAZY = {"TransformerVQ": "tvq.models.transformer_vq", "TransformerVQOutput": "tvq.models.transformer_vq",
         "LayerState": "tvq.state", "TransformerVQState": "tvq.state"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tvq' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
