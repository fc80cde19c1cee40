"""Vector quantization of attention keys with EMA codebooks (SPEC section 2)."""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


_RECOMPUTING = contextvars.ContextVar("tvq_recomputing", default=False)


@contextlib.contextmanager
def recomputing():
    """Marks activation checkpointing's second run of a forward: its codebook statistics were
    gathered by the first run and are not gathered again."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


@dataclass
class Quantized:
    keys: Tensor    # (B, H, T, D_k) quantized keys; straight-through: gradient flows to the input keys
    codes: Tensor   # (B, H, T) long, the assigned code of each key
    commit: Tensor  # () mean over tokens of sum over heads ||k - sg(c_z)||^2


class VectorQuantizer(nn.Module):
    """Per-head codebooks kept as EMA sums and counts; never trained by gradient.

    In training mode every forward adds its assignment statistics to an accumulator;
    :meth:`apply_update` folds them into the EMA buffers. Calling it once per optimizer step
    makes gradient accumulation (and data-parallel ranks, through the ``all_reduce`` hook)
    give exactly the update of one big batch. The accumulator is not a buffer: it is not
    saved, not broadcast by DDP, and follows the codebook's device and dtype.
    """

    # layout of the flat statistics vector: per head [sum (S*D_k) | count (S)] then 3 scalars
    _N_SCALARS = 3  # tokens, total squared quantization error, total squared key norm

    def __init__(self, n_head: int, n_code: int, d_k: int, decay: float):
        super().__init__()
        self.n_head, self.n_code, self.d_k, self.decay = n_head, n_code, d_k, decay
        # the official code's init: its dense-kernel initializer (fan-in normal) on shape (H, S, D_k),
        # std (H S)^-1/2; with c_count = 1 these are the initial codewords
        self.register_buffer("c_sum", torch.randn(n_head, n_code, d_k) * (n_head * n_code) ** -0.5)  # (H, S, D_k)
        self.register_buffer("c_count", torch.ones(n_head, n_code))  # (H, S)
        self._stats: Tensor | None = None

    def codebook(self) -> Tensor:
        """The codewords C = c_sum / max(c_count, 0.01) -> (H, S, D_k)."""
        return self.c_sum / self.c_count.clamp_min(0.01)[..., None]

    @property
    def stats_numel(self) -> int:
        return self.n_head * self.n_code * (self.d_k + 1) + self._N_SCALARS

    def forward(self, k: Tensor, token_mask: Tensor | None = None) -> Quantized:
        """Quantize keys k (B, H, T, D_k); token_mask (B, T) bool excludes padding from stats."""
        c = self.codebook().to(k.dtype)  # (H, S, D_k)
        with torch.no_grad():
            # argmin_s ||k - c_s||^2 = argmin_s (||c_s||^2 - 2 k.c_s), one fused product per (b, h)
            B, H, T, K = k.shape
            cb = c.expand(B, H, -1, K).reshape(B * H, -1, K)  # (B H, S, D_k)
            dist = torch.baddbmm(cb.square().sum(-1, keepdim=True).transpose(1, 2), k.reshape(B * H, T, K),
                                 cb.transpose(1, 2), alpha=-2)  # (B H, T, S)
            codes = dist.argmin(-1).view(B, H, T)
        heads = torch.arange(self.n_head, device=k.device)[None, :, None]  # (1, H, 1)
        c_z = c[heads, codes]  # (B, H, T, D_k)
        k_st = c_z + (k - k.detach()) if k.requires_grad else c_z  # straight-through estimator
        err = (k - c_z).square().sum(-1).sum(1)  # (B, T), summed over heads
        if token_mask is None:
            commit = err.mean()
        else:
            w = token_mask.to(err.dtype)
            commit = (err * w).sum() / w.sum().clamp_min(1.0)
        # a compiled graph recomputes inside itself, never through here (and dynamo cannot read a ContextVar)
        if self.training and (torch.compiler.is_compiling() or not _RECOMPUTING.get()):
            self._accumulate(k.detach(), codes, err.detach(), token_mask)
        return Quantized(k_st, codes, commit)

    @torch.no_grad()
    def _accumulate(self, k: Tensor, codes: Tensor, err: Tensor, token_mask: Tensor | None) -> None:
        acc_dtype = self.c_sum.dtype
        onehot = nn.functional.one_hot(codes, self.n_code).to(acc_dtype)  # (B, H, T, S)
        if token_mask is not None:
            onehot = onehot * token_mask[:, None, :, None].to(acc_dtype)
            w = token_mask.to(acc_dtype)
        else:
            w = torch.ones(err.shape, dtype=acc_dtype, device=err.device)
        k_sum = torch.einsum("bhts,bhtk->hsk", onehot, k.to(acc_dtype))  # (H, S, D_k)
        count = onehot.sum((0, 2))  # (H, S)
        scalars = torch.stack([
            w.sum(),
            (err.to(acc_dtype) * w).sum(),
            (k.to(acc_dtype).square().sum((1, 3)) * w).sum(),
        ])
        flat = torch.cat([k_sum.flatten(), count.flatten(), scalars])
        if self._stats is None or self._stats.dtype != acc_dtype or self._stats.device != flat.device:
            self._stats = torch.zeros_like(flat)
        self._stats += flat

    def pending_stats(self) -> Tensor:
        """The statistics accumulated since the last update, as one flat vector (zeros if none)."""
        if self._stats is None or self._stats.device != self.c_sum.device or self._stats.dtype != self.c_sum.dtype:
            self._stats = torch.zeros(self.stats_numel, dtype=self.c_sum.dtype, device=self.c_sum.device)
        return self._stats

    @torch.no_grad()
    def apply_update(self, stats: Tensor | None = None) -> dict[str, float]:
        """EMA step c <- decay * c + (1 - decay) * stats, then clear the accumulator.

        ``stats`` defaults to :meth:`pending_stats`; pass an all-reduced copy for data-parallel
        training. Returns codebook health metrics of the statistics just applied.
        """
        stats = self.pending_stats() if stats is None else stats
        H, S, K = self.n_head, self.n_code, self.d_k
        k_sum = stats[: H * S * K].view(H, S, K)
        count = stats[H * S * K: H * S * (K + 1)].view(H, S)
        tokens, err, norm = stats[H * S * (K + 1):].tolist()
        self.c_sum.mul_(self.decay).add_(k_sum, alpha=1 - self.decay)
        self.c_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self._stats = None
        return self._metrics(count, tokens, err, norm)

    def _metrics(self, count: Tensor, tokens: float, err: float, norm: float) -> dict[str, float]:
        total = count.sum(-1, keepdim=True)  # (H, 1)
        p = count / total.clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (H,) nats
        return {
            "usage": (count > 0).float().mean().item(),            # fraction of codes hit this step
            "dead": (self.c_count < 1.0).float().mean().item(),     # fraction with EMA count < 1
            "entropy": (entropy.mean() / math.log(self.n_code)).item() if self.n_code > 1 else 1.0,
            "rel_err": math.sqrt(err / norm) if norm > 0 else 0.0,  # ||k - k_hat|| / ||k||
            "tokens": tokens,
        }
