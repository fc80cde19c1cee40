"""Sinusoidal embeddings of relative distance (Transformer-XL style)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sinusoids(n_pos: int, width: int, base: float, *, dtype: torch.dtype, device=None) -> Tensor:
    """Embeddings of distances 0..n_pos-1: [sin(d / base^(2i/width)), cos(...)] -> (n_pos, width)."""
    half = width // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=device) * 2.0 / width)
    angle = torch.arange(n_pos, dtype=torch.float64, device=device)[:, None] * inv_freq  # (P, W/2)
    emb = torch.cat([angle.sin(), angle.cos()], dim=-1)  # (P, 2 * (W/2))
    if emb.shape[-1] < width:  # odd width: pad one zero column
        emb = torch.nn.functional.pad(emb, (0, width - emb.shape[-1]))
    return emb.to(dtype)


class SinusoidTable(nn.Module):
    """:func:`sinusoids` as a buffer (not saved) in the module's own dtype, computed in float64 and rounded
    once to it: moving or casting the module (``model.double()``, ``.to(device)``) rebuilds it, so a float64
    model gets the exact float64 table rather than a float32 one upcast. ``table()`` -> (n_pos, width)."""

    def __init__(self, n_pos: int, width: int, base: float):
        super().__init__()
        self.n_pos, self.width, self.base = n_pos, width, base
        self.register_buffer("table", sinusoids(n_pos, width, base, dtype=torch.get_default_dtype()),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.table.device.type != "meta":  # a meta module gets its values when it is materialised
            self.table = sinusoids(self.n_pos, self.width, self.base, dtype=self.table.dtype, device=self.table.device)
        return self

    def forward(self) -> Tensor:
        return self.table
