"""Sinusoidal embeddings of relative distance (Transformer-XL style)."""

from __future__ import annotations

import torch
from torch import Tensor


def sinusoids(n_pos: int, width: int, base: float, *, dtype: torch.dtype, device=None) -> Tensor:
    """Embeddings of distances 0..n_pos-1: [sin(d / base^(2i/width)), cos(...)] -> (n_pos, width)."""
    half = width // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=device) * 2.0 / width)
    angle = torch.arange(n_pos, dtype=torch.float64, device=device)[:, None] * inv_freq  # (P, W/2)
    emb = torch.cat([angle.sin(), angle.cos()], dim=-1)  # (P, 2 * (W/2))
    if emb.shape[-1] < width:  # odd width: pad one zero column
        emb = torch.nn.functional.pad(emb, (0, width - emb.shape[-1]))
    return emb.to(dtype)
