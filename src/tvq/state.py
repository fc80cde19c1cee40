"""The attention state carried between calls: what a model remembers of the past."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerState:
    """State of one GAU after it has seen ``pos`` tokens.

    For ``attention="vq"`` the state has a fixed size whatever ``pos`` is:

    - ``keys``    (B, H, M, D_k): quantized keys of the last M = ``mem_len`` positions
      (slots before the start of the sequence, when pos < M, are zeros and never attended);
    - ``values``  (B, H, M, D_v): their values;
    - ``codes``   (B, H, M): their codebook indices (long);
    - ``cache_count`` (B, H, S): per code, how many keys older than the window it stands for;
    - ``cache_mean``  (B, H, S, D_v): per code, the mean value of those keys (float32 or wider).

    For ``attention="full"`` ``keys``/``values`` hold every past position (B, H, pos, ...) and
    the code and cache fields are ``None``.
    """

    keys: Tensor
    values: Tensor
    codes: Tensor | None = None
    cache_count: Tensor | None = None
    cache_mean: Tensor | None = None

    def detach(self) -> "LayerState":
        return LayerState(*(None if t is None else t.detach() for t in self._tensors()))

    def _tensors(self) -> tuple:
        return (self.keys, self.values, self.codes, self.cache_count, self.cache_mean)


@dataclass
class TransformerVQState:
    """The whole model's state: one :class:`LayerState` per GAU and the number of tokens seen.

    Batch-first; pass it back as ``model(next_ids, state=state)`` to continue the same
    sequences exactly. Call :meth:`detach` between optimizer steps to cut the graph.
    """

    layers: list[LayerState]
    pos: int

    def detach(self) -> "TransformerVQState":
        return TransformerVQState([layer.detach() for layer in self.layers], self.pos)

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    def to(self, *args, **kwargs) -> "TransformerVQState":
        """Move tensors (e.g. ``state.to("cuda")``); dtype changes apply to floating fields only."""
        def move(t):
            if t is None:
                return None
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
            return t if device is None else t.to(device)

        return TransformerVQState(
            [LayerState(*(move(t) for t in layer._tensors())) for layer in self.layers], self.pos
        )
