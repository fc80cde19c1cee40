"""The attention sublayer of the mha/mqa models (the official optimized code's variants).

Against the GAU (tvq.layers.gau): d_model / d_k query heads of width d_k, values of width d_k
without SiLU, no gate, and key/value heads that are either one per query head (mha) or a single
one shared by every query head (mqa). Keys are quantized per key/value head, so an mqa layer
has one codebook and one cache. The attention ops take one key/value head per query head: an mqa
layer passes its keys, values, codes, cache and relative embeddings expanded over the query heads
(views), while its state keeps the one head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tvq.config import TransformerVQConfig
from tvq.layers.gau import GAU
from tvq.layers.norm import RMSNorm
from tvq.layers.position import SinusoidTable
from tvq.layers.residual import layer_drop
from tvq.layers.vq import VectorQuantizer
from tvq.ops import blockwise_attention, dense_attention, quadratic_attention
from tvq.state import LayerState


def per_query_head(t: Tensor, n_q_head: int, dim: int = 1) -> Tensor:
    """t with n_kv key/value heads on ``dim`` -> n_q_head heads: itself (mha) or its one head expanded (mqa)."""
    if t.shape[dim] == n_q_head:
        return t
    shape = list(t.shape)
    shape[dim] = n_q_head
    return t.expand(shape)


class Attention(nn.Module):
    """x + LayerDrop(Dropout(Attn(q, k, v) W_o)), pre-norm (RMS, no gain or bias, as the official code).

    q = norm(x W_q) D_k^-1/4 (H_q heads), k = norm(x W_k) D_k^-1/4 and v = x W_v (H_kv heads),
    Transformer-XL relative biases (embeddings per key/value head, u and v per query head), and
    with ``attention="vq"`` keys quantized against one codebook per key/value head.
    """

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        self.config = config
        D, Dk = config.d_model, config.d_k
        Hq, Hkv = config.n_q_head, config.n_kv_head
        self.norm = RMSNorm(D, config.norm_eps, affine=False)
        self.qk_norm = RMSNorm(Dk, config.norm_eps, affine=False)
        self.w_q = nn.Linear(D, Hq * Dk, bias=False)
        self.w_kv = nn.Linear(D, 2 * Hkv * Dk, bias=False)  # fused k, v
        self.w_r = nn.Linear(D, Hkv * Dk, bias=False)  # relative position embeddings
        self.w_o = nn.Linear(Hq * Dk, D, bias=False)
        self.xl_u = nn.Parameter(torch.zeros(Hq, Dk))
        self.xl_v = nn.Parameter(torch.zeros(Hq, Dk))
        self.quantizer = (
            VectorQuantizer(Hkv, config.n_code, Dk, config.codebook_decay, config.codebook_init,
                            config.codebook_revive) if config.attention == "vq" else None
        )
        # not in the paper: a learned offset of each query head's cache scores (config.cache_bias)
        use_bias = config.attention == "vq" and config.agg_cache and config.cache_bias  # no cache, no offset
        self.cache_bias = nn.Parameter(torch.zeros(Hq)) if use_bias else None
        self.drop_sin = nn.Dropout(config.dropout_sin)
        self.drop_res = nn.Dropout(config.dropout_res)
        self.sin = SinusoidTable(config.mem_len + 1, D, config.rel_pos_base)  # (M + 1, D), in the model's dtype

    def reset_parameters(self) -> None:
        """Fan-in scaled normal kernels; zero u and v."""
        for lin in (self.w_q, self.w_kv, self.w_r, self.w_o):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
        nn.init.zeros_(self.xl_u)
        nn.init.zeros_(self.xl_v)
        if self.cache_bias is not None:
            nn.init.constant_(self.cache_bias, self.config.cache_bias_init)

    def position_terms(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Relative embeddings of distances 0..M per key/value head (H_kv, M + 1, D_k) and the biases u, v
        per query head (H_q, D_k), all scaled by D_k^-1/4 like q and k."""
        cfg = self.config
        Hkv, Dk, M = cfg.n_kv_head, cfg.d_k, cfg.mem_len
        scale = Dk**-0.25
        rel = self.w_r(self.drop_sin(self.sin().to(dtype)))  # (M + 1, H_kv D_k)
        rel = rel.view(M + 1, Hkv, Dk).transpose(0, 1) * scale  # (H_kv, M + 1, D_k)
        return rel, self.xl_u * scale, self.xl_v * scale

    def initial_state(self, batch_size: int, dtype: torch.dtype, device) -> LayerState:
        """The empty state, one key/value head per codebook (see :class:`tvq.state.LayerState`)."""
        cfg = self.config
        Hkv, M, Dk = cfg.n_kv_head, cfg.mem_len, cfg.d_k
        if cfg.attention == "full":
            return LayerState(torch.zeros(batch_size, Hkv, 0, Dk, dtype=dtype, device=device),
                              torch.zeros(batch_size, Hkv, 0, Dk, dtype=dtype, device=device))
        acc = torch.promote_types(dtype, torch.float32)
        return LayerState(
            keys=torch.zeros(batch_size, Hkv, M, Dk, dtype=dtype, device=device),
            values=torch.zeros(batch_size, Hkv, M, Dk, dtype=dtype, device=device),
            codes=torch.zeros(batch_size, Hkv, M, dtype=torch.long, device=device),
            cache_count=torch.zeros(batch_size, Hkv, cfg.n_code, dtype=acc, device=device),
            cache_mean=torch.zeros(batch_size, Hkv, cfg.n_code, Dk, dtype=acc, device=device),
        )

    def forward(
        self, x: Tensor, state: LayerState, pos: int, token_mask: Tensor | None = None,
        start: Tensor | None = None,
    ) -> tuple[Tensor, LayerState, Tensor]:
        """x (B, T, D) at positions pos..pos+T-1 -> (x', new state, commitment loss); ``start`` as in
        :meth:`tvq.layers.gau.GAU.forward`."""
        cfg = self.config
        B, T, _ = x.shape
        Hq, Hkv, Dk, M = cfg.n_q_head, cfg.n_kv_head, cfg.d_k, cfg.mem_len
        scale = Dk**-0.25

        h = self.norm(x)  # (B, T, D)
        k, v = self.w_kv(h).split([Hkv * Dk, Hkv * Dk], -1)
        q = self.qk_norm(self.w_q(h).view(B, T, Hq, Dk)).transpose(1, 2) * scale  # (B, H_q, T, D_k)
        k = self.qk_norm(k.view(B, T, Hkv, Dk)).transpose(1, 2) * scale  # (B, H_kv, T, D_k)
        v = v.view(B, T, Hkv, Dk).transpose(1, 2)  # (B, H_kv, T, D_k)
        rel, u, vb = self.position_terms(h.dtype)  # (H_kv, M + 1, D_k), (H_q, D_k), (H_q, D_k)
        rel = per_query_head(rel, Hq, 0)  # (H_q, M + 1, D_k)

        if self.quantizer is None:
            commit = x.new_zeros(())
            keys = torch.cat([state.keys, k], 2)  # (B, H_kv, pos + T, D_k)
            values = torch.cat([state.values, v], 2)
            attn = dense_attention(q, per_query_head(keys, Hq), per_query_head(values, Hq), rel=rel, u=u, v=vb,
                                   mem_len=M, chunk=cfg.block_len, start=start)
            new_state = LayerState(keys, values)
        else:
            quant = self.quantizer(k, token_mask)
            commit = quant.commit
            keys = torch.cat([state.keys, quant.keys], 2)  # (B, H_kv, M + T, D_k)
            values = torch.cat([state.values, v], 2)  # (B, H_kv, M + T, D_k)
            codes = torch.cat([state.codes, quant.codes], 2)  # (B, H_kv, M + T)
            n_invalid = GAU.empty_slots(M, pos, start)  # int or (B,)
            cache = tuple(per_query_head(t, Hq, 0 if i == 0 else 1) for i, t in enumerate(
                (self.quantizer.codebook(), state.cache_count, state.cache_mean)))  # (H_q, S, D_k), (B, H_q, S[, D_k])
            common = dict(n_invalid=n_invalid, rel=rel, u=u, v=vb, mem_len=M, agg_cache=cfg.agg_cache,
                          grad_thru_cache=cfg.grad_thru_cache, straight_through=cfg.straight_through,
                          cache_bias=self.cache_bias)
            q_keys, q_values = per_query_head(keys, Hq), per_query_head(values, Hq)  # (B, H_q, M + T, D_k)
            if cfg.attn_impl == "quadratic":
                attn = quadratic_attention(q, q_keys, q_values, **common, block_len=cfg.block_len,
                                           cache=cache if cfg.agg_cache else None)
            else:
                attn = blockwise_attention(q, q_keys, q_values, per_query_head(codes, Hq), **common,
                                           block_len=cfg.block_len, cache=cache)
            new_state = self._advance(state, keys, values, codes, n_invalid, T)

        out = attn.transpose(1, 2).reshape(B, T, Hq * Dk)  # (B, T, H_q D_k)
        res = self.drop_res(self.w_o(out))  # (B, T, D)
        return x + layer_drop(res, cfg.layerdrop, self.training), new_state, commit

    # the state's update is the GAU's: the window keeps the last M keys, the leaving ones join the cache
    _advance = GAU._advance
