"""The strongest quadratic baseline a user would pick: a standard pre-norm transformer whose
attention is ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention where the
device has it), with a key/value cache for decoding."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class SDPABlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:  # (B, H, P, D_h) keys and values of earlier positions
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        # with a cache, a single query may see every key; longer chunks need the causal mask
        causal = cache is None or T > 1
        if causal and cache is not None:
            P = k.shape[2] - T
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x)), (k, v)


class SDPATransformer(nn.Module):
    """Decoder-only transformer: embeddings, ``n_layer`` pre-norm blocks (attention + 4x MLP), head."""

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, n_head: int):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(SDPABlock(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.grad_checkpoint = False  # training: recompute each block in backward

    def forward(self, input_ids: Tensor, cache: list | None = None) -> tuple[Tensor, list]:
        """input_ids (B, T) -> logits (B, T, V) float32, and the per-layer key/value cache."""
        x = self.embed(input_ids)
        new_cache = []
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            if recompute:
                x, kv = checkpoint(block, x, layer_cache, use_reentrant=False)
            else:
                x, kv = block(x, layer_cache)
            new_cache.append(kv)
        return self.head(self.ln_f(x)).float(), new_cache


def sdpa_like(n_params: int, vocab_size: int, d_model: int, n_head: int) -> SDPATransformer:
    """An SDPA transformer of width ``d_model`` with the layer count closest to ``n_params``."""
    per_layer = 12 * d_model * d_model + 9 * d_model  # attention 4 D^2, MLP 8 D^2 (+ biases, norms)
    fixed = 2 * vocab_size * d_model + 2 * d_model
    n_layer = max(1, round((n_params - fixed) / per_layer))
    return SDPATransformer(vocab_size, d_model, n_layer, n_head)
