"""The attention state carried between calls: what a model remembers of the past."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def empty_slots(mem_len: int, pos: int, start: Tensor | None) -> int | Tensor:
    """Empty window slots of a state at ``pos``: those before position 0 and, per row (B,), before its
    ``start`` (left padding)."""
    return max(0, mem_len - pos) if start is None else (start + (mem_len - pos)).clamp_min(0)


@dataclass
class LayerState:
    """State of one attention sublayer after it has seen ``pos`` tokens (its transition from one chunk
    to the next is :func:`tvq.ops.cache.advance_state`). H is the sublayer's key/value heads.

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


def zero_states(layers: list[LayerState], device: torch.device | str) -> list[LayerState]:
    """Zero-filled states of the shapes and dtypes of ``layers`` (built on any device, e.g. "meta") on ``device``:
    views of one buffer per dtype, so one fill per dtype rather than one per tensor (five per sublayer; on a GPU
    a launch each). The views are disjoint: writing one layer's state in place leaves the others as they are."""
    sizes: dict[torch.dtype, int] = {}
    for layer in layers:
        for t in layer._tensors():
            if t is not None:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    bufs = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()}  # (numel,) per dtype
    used = dict.fromkeys(bufs, 0)

    def carve(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        start = used[t.dtype]
        used[t.dtype] = start + t.numel()
        return bufs[t.dtype][start: start + t.numel()].view(t.shape)

    return [LayerState(*(carve(t) for t in layer._tensors())) for layer in layers]


@dataclass
class TransformerVQState:
    """The whole model's state: one :class:`LayerState` per attention sublayer and the number of tokens seen.

    Batch-first; pass it back as ``model(next_ids, state=state)`` to continue the same
    sequences exactly. Call :meth:`detach` between optimizer steps to cut the graph.

    ``pos`` counts positions, padding included. ``start`` (B,) long, or ``None`` for all zeros, is the
    first real position of each row: the positions before it are left padding, whose keys are never
    attended and never enter the cache, so row b is its unpadded self at positions ``pos - start[b]``.
    """

    layers: list[LayerState]
    pos: int
    start: Tensor | None = None

    def detach(self) -> "TransformerVQState":
        return TransformerVQState([layer.detach() for layer in self.layers], self.pos, self.start)

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TransformerVQState":
        """Move to a device and/or cast keys and values to ``dtype``.

        Codes stay long; the cache stays float32 or wider so counts and means remain exact.
        """
        def move(t: Tensor | None, kind: str) -> Tensor | None:
            if t is None:
                return None
            if kind == "codes" or dtype is None:
                return t.to(device=device)
            return t.to(device=device, dtype=dtype if kind == "kv" else torch.promote_types(dtype, torch.float32))

        return TransformerVQState([
            LayerState(move(lay.keys, "kv"), move(lay.values, "kv"), move(lay.codes, "codes"),
                       move(lay.cache_count, "cache"), move(lay.cache_mean, "cache"))
            for lay in self.layers
        ], self.pos, None if self.start is None else self.start.to(device=device))
