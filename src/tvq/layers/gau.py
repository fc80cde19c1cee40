"""The gated attention unit (GAU), Transformer-VQ's only layer type (SPEC section 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tvq.config import TransformerVQConfig
from tvq.layers.norm import RMSNorm
from tvq.layers.position import SinusoidTable
from tvq.layers.vq import VectorQuantizer
from tvq.ops import blockwise_attention, dense_attention, quadratic_attention
from tvq.ops.cache import code_statistics, merge_cache
from tvq.ops.linear import fused_linear_ok, linear
from tvq.state import LayerState


class GAU(nn.Module):
    """x + LayerDrop(Dropout((Attn(q, k, v) * g) W_o)), pre-norm, single or multi-head.

    q = norm(x W_q) D_k^-1/4 and k = norm(x W_k) D_k^-1/4 (no gain or bias), v = silu(x W_v),
    g = silu(x W_g); with ``attention="vq"`` keys are quantized against a per-head codebook.
    Relative positions are Transformer-XL biases over distances 0..mem_len.
    """

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        self.config = config
        D, H, Dk, Dv = config.d_model, config.n_head, config.d_k, config.d_v
        self.norm = RMSNorm(D, config.norm_eps)
        self.qk_norm = RMSNorm(Dk, config.norm_eps, affine=False)
        self.w_q = nn.Linear(D, H * Dk, bias=False)
        self.w_kvg = nn.Linear(D, H * (Dk + 2 * Dv), bias=False)  # fused k, v, g
        self.w_r = nn.Linear(D, H * Dk, bias=False)  # relative position embeddings
        self.w_o = nn.Linear(H * Dv, D, bias=False)
        self.xl_u = nn.Parameter(torch.zeros(H, Dk))
        self.xl_v = nn.Parameter(torch.zeros(H, Dk))
        self.quantizer = (
            VectorQuantizer(H, config.n_code, Dk, config.codebook_decay, config.codebook_init, config.codebook_revive)
            if config.attention == "vq" else None
        )
        # not in the paper: a learned offset of each head's cache scores (config.cache_bias)
        use_bias = config.attention == "vq" and config.agg_cache and config.cache_bias  # no cache, no offset
        self.cache_bias = nn.Parameter(torch.zeros(H)) if use_bias else None
        self.drop_sin = nn.Dropout(config.dropout_sin)
        self.drop_res = nn.Dropout(config.dropout_res)
        self.sin = SinusoidTable(config.mem_len + 1, D, config.rel_pos_base)  # (M + 1, D), in the model's dtype

    def reset_parameters(self) -> None:
        """Paper initialisation: fan-in scaled normal kernels; zero u, v and norm bias."""
        for lin in (self.w_q, self.w_kvg, self.w_r, self.w_o):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
        nn.init.zeros_(self.xl_u)
        nn.init.zeros_(self.xl_v)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if self.cache_bias is not None:
            nn.init.constant_(self.cache_bias, self.config.cache_bias_init)

    def position_terms(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Relative embeddings of distances 0..M (H, M + 1, D_k) and the biases u, v (H, D_k),
        all scaled by D_k^-1/4 like q and k (sinusoid dropout applies in training)."""
        cfg = self.config
        H, Dk, M = cfg.n_head, cfg.d_k, cfg.mem_len
        scale = Dk**-0.25
        rel = self.w_r(self.drop_sin(self.sin().to(dtype)))  # (M + 1, H D_k)
        rel = rel.view(M + 1, H, Dk).transpose(0, 1) * scale  # (H, M + 1, D_k)
        return rel, self.xl_u * scale, self.xl_v * scale

    def initial_state(self, batch_size: int, dtype: torch.dtype, device) -> LayerState:
        cfg = self.config
        H, M = cfg.n_head, cfg.mem_len
        if cfg.attention == "full":
            return LayerState(torch.zeros(batch_size, H, 0, cfg.d_k, dtype=dtype, device=device),
                              torch.zeros(batch_size, H, 0, cfg.d_v, dtype=dtype, device=device))
        acc = torch.promote_types(dtype, torch.float32)
        return LayerState(
            keys=torch.zeros(batch_size, H, M, cfg.d_k, dtype=dtype, device=device),
            values=torch.zeros(batch_size, H, M, cfg.d_v, dtype=dtype, device=device),
            codes=torch.zeros(batch_size, H, M, dtype=torch.long, device=device),
            cache_count=torch.zeros(batch_size, H, cfg.n_code, dtype=acc, device=device),
            cache_mean=torch.zeros(batch_size, H, cfg.n_code, cfg.d_v, dtype=acc, device=device),
        )

    def forward(
        self, x: Tensor, state: LayerState, pos: int, token_mask: Tensor | None = None,
        start: Tensor | None = None,
    ) -> tuple[Tensor, LayerState, Tensor]:
        """x (B, T, D) at positions pos..pos+T-1 -> (x', new state, commitment loss).

        ``start`` (B,) long: each row's first real position (left padding before it), or None (0)."""
        cfg = self.config
        B, T, _ = x.shape
        H, Dk, Dv, M = cfg.n_head, cfg.d_k, cfg.d_v, cfg.mem_len
        scale = Dk**-0.25

        h = self.norm(x)  # (B, T, D)
        fused = self._plain_projections() and fused_linear_ok(h, self.w_q.weight, self.w_kvg.weight, self.w_o.weight)
        if fused:  # CPU inference: oneDNN GEMMs, SiLU applied inside the v/g one
            q = linear(h, self.w_q.weight)
            k = linear(h, self.w_kvg.weight[: H * Dk])
            v, g = linear(h, self.w_kvg.weight[H * Dk:], act="silu").split([H * Dv, H * Dv], -1)
        else:
            q = self.w_q(h)
            k, v, g = self.w_kvg(h).split([H * Dk, H * Dv, H * Dv], -1)
            v, g = F.silu(v), F.silu(g)
        q = self.qk_norm(q.view(B, T, H, Dk)).transpose(1, 2) * scale  # (B, H, T, D_k)
        k = self.qk_norm(k.view(B, T, H, Dk)).transpose(1, 2) * scale  # (B, H, T, D_k)
        v = v.view(B, T, H, Dv).transpose(1, 2)  # (B, H, T, D_v); g (B, T, H D_v)
        rel, u, vb = self.position_terms(h.dtype)  # (H, M + 1, D_k), (H, D_k), (H, D_k)

        if self.quantizer is None:
            commit = x.new_zeros(())
            keys = torch.cat([state.keys, k], 2)  # (B, H, pos + T, D_k)
            values = torch.cat([state.values, v], 2)
            attn = dense_attention(q, keys, values, rel=rel, u=u, v=vb, mem_len=M, chunk=cfg.block_len,
                                   start=start)
            new_state = LayerState(keys, values)
        else:
            quant = self.quantizer(k, token_mask)
            commit = quant.commit
            keys = torch.cat([state.keys, quant.keys], 2)  # (B, H, M + T, D_k)
            values = torch.cat([state.values, v], 2)  # (B, H, M + T, D_v)
            codes = torch.cat([state.codes, quant.codes], 2)  # (B, H, M + T)
            n_invalid = self.empty_slots(M, pos, start)  # int or (B,)
            cache = (self.quantizer.codebook(), state.cache_count, state.cache_mean)
            common = dict(n_invalid=n_invalid, rel=rel, u=u, v=vb, mem_len=M,
                          agg_cache=cfg.agg_cache, grad_thru_cache=cfg.grad_thru_cache,
                          straight_through=cfg.straight_through, cache_bias=self.cache_bias)
            if cfg.attn_impl == "quadratic":
                attn = quadratic_attention(q, keys, values, **common, block_len=cfg.block_len,
                                           cache=cache if cfg.agg_cache else None)
            else:
                attn = blockwise_attention(q, keys, values, codes, **common,
                                           block_len=cfg.block_len, cache=cache)
            new_state = self._advance(state, keys, values, codes, n_invalid, T)

        out = attn.transpose(1, 2).reshape(B, T, H * Dv) * g  # (B, T, H D_v)
        if fused and not self.training:  # no dropout or LayerDrop: the residual add joins the GEMM
            return linear(out, self.w_o.weight, residual=x), new_state, commit
        res = self.drop_res(self.w_o(out))  # (B, T, D)
        if self.training and cfg.layerdrop > 0:
            keep = torch.rand(B, 1, 1, device=x.device) >= cfg.layerdrop
            res = res * keep.to(res.dtype) / (1 - cfg.layerdrop)
        return x + res, new_state, commit

    @staticmethod
    def empty_slots(mem_len: int, pos: int, start: Tensor | None) -> int | Tensor:
        """Empty window slots of a state at ``pos``: those before position 0 and, per row (B,), before
        its ``start`` (left padding)."""
        return max(0, mem_len - pos) if start is None else (start + (mem_len - pos)).clamp_min(0)

    def _plain_projections(self) -> bool:
        """Whether the projections are plain ``nn.Linear`` without hooks, so that the fused path, which
        reads their weights directly, computes what their forwards would (not so for, e.g., a LoRA or
        quantized replacement, or a hook)."""
        return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
                   for m in (self.w_q, self.w_kvg, self.w_o))

    def _advance(self, state: LayerState, keys, values, codes, n_invalid: int | Tensor, T: int) -> LayerState:
        """Keep the last M keys as the window; fold the T that leave it into the cache (not the empty
        slots: the first ``n_invalid``, an int or one per row (B,))."""
        count, mean = state.cache_count, state.cache_mean
        if self.config.agg_cache:
            leaving = values[:, :, :T] if self.config.grad_thru_cache else values[:, :, :T].detach()
            if isinstance(n_invalid, Tensor):
                valid = torch.arange(T, device=keys.device) >= n_invalid[:, None, None]  # (B, 1, T)
            else:
                valid = torch.arange(T, device=keys.device) >= n_invalid
            n, s = code_statistics(codes[:, :, :T], leaving, valid, self.config.n_code, mean.dtype)
            count, mean = merge_cache(count, mean, n, s)
        return LayerState(keys[:, :, T:], values[:, :, T:], codes[:, :, T:], count, mean)
