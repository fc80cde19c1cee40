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
    model gets the exact float64 table rather than a float32 one upcast. ``table()`` -> (n_pos, width).

    ``scaled(dtype)`` is the table times ``scale`` (the attention's D_k^-1/4): a second buffer built with the table
    (from float64, rounded once), and in another dtype a cast of it, kept until the module is moved or cast. So a
    forward neither multiplies nor casts it (under autocast the cast would be a kernel per sublayer and step)."""

    def __init__(self, n_pos: int, width: int, base: float, scale: float = 1.0):
        super().__init__()
        self.n_pos, self.width, self.base, self.scale = n_pos, width, base, scale
        table = sinusoids(n_pos, width, base, dtype=torch.float64)  # (n_pos, width)
        dtype = torch.get_default_dtype()
        self.register_buffer("table", table.to(dtype), persistent=False)
        self.register_buffer("scaled_table", (table * scale).to(dtype), persistent=False)
        self._casts: dict[torch.dtype, Tensor] = {}

    @torch.no_grad()
    def reset_table(self) -> None:
        """Compute both tables again in place (after a load that left them uninitialised)."""
        table = sinusoids(self.n_pos, self.width, self.base, dtype=torch.float64, device=self.table.device)
        self.table.copy_(table)
        self.scaled_table.copy_(table * self.scale)
        self._casts = {}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.table.device.type != "meta":  # a meta module gets its values when it is materialised
            self.reset_table()
        self._casts = {}
        return self

    def forward(self) -> Tensor:
        return self.table

    def scaled(self, dtype: torch.dtype) -> Tensor:
        """scale * the table in ``dtype`` -> (n_pos, width)."""
        if dtype == self.scaled_table.dtype:
            return self.scaled_table
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # a graph casts it itself, and
            return self.scaled_table.to(dtype)  # inference tensors cannot be saved for backward: none kept
        cast = self._casts.get(dtype)
        if cast is None or cast.device != self.scaled_table.device:
            cast = self._casts[dtype] = self.scaled_table.to(dtype)
        return cast
