"""Token-by-token decoding at constant cost: ring-buffer windows and an in-place cache.

``TransformerVQ.forward`` with a one-token chunk already costs O(M + S) per token, but it
rebuilds the window (a concatenation of M keys) and recomputes per-layer constants on every
call. :class:`VQDecoder` holds the state in place instead: slot ``p % M`` of each GAU's window
holds position p, the token leaving the window is folded into the count/mean cache with two
scatters, and the relative embeddings, scaled biases and codebooks are computed once. It
computes exactly what the blockwise path computes for a one-token chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from tvq.layers.gau import GAU
from tvq.ops.cache import cache_log_count
from tvq.state import LayerState, TransformerVQState


@dataclass
class _GAUBuffers:
    keys: Tensor    # (B, H, M, D_k) ring: slot p % M holds position p of the last M
    values: Tensor  # (B, H, M, D_v)
    codes: Tensor   # (B, H, M)
    count: Tensor   # (B, H, S)
    mean: Tensor    # (B, H, S, D_v)
    # constants for this decoder's lifetime (eval mode: no dropout, codebook fixed)
    w_in: Tensor      # (D, H (2 D_k + 2 D_v)) fused [W_q; W_k; W_v; W_g], transposed: row-vector products
    w_out: Tensor     # (H D_v, D) W_o transposed
    heads: Tensor     # (H,) arange, for codeword look-up
    rel: Tensor       # (H, M + 1, D_k) relative embeddings of distances 0..M
    u: Tensor         # (H, D_k)
    v: Tensor         # (H, D_k)
    codebook: Tensor  # (H, S, D_k)
    c_sq: Tensor      # (H, S) squared codeword norms


class VQDecoder:
    """One-token steps from a :class:`TransformerVQState` (``attention="vq"`` models, eval mode)."""

    def __init__(self, model, state: TransformerVQState, compile: bool = False):
        if model.config.attention != "vq":
            raise ValueError("VQDecoder needs attention='vq'; the dense baseline decodes with model(ids, state=...)")
        self.model, self.pos = model, state.pos
        self._pos = torch.tensor(state.pos, device=model.embed.weight.device)  # 0-d: no recompiles
        # torch.compile fuses the ~60 small ops of each GAU step (worth it for long generations:
        # compiling takes 15-20 s on a CPU); on a CPU the C++ wrapper also takes the Python
        # launcher out of every step (1.2-1.3x more tokens/s on bench-small)
        self._step = _model_step
        if compile:
            cpu = model.embed.weight.device.type == "cpu"
            self._step = torch.compile(_model_step, fullgraph=True, options={"cpp_wrapper": True} if cpu else None)
        M = model.config.mem_len
        shift = state.pos % M  # ordered slot e holds position pos - M + e, i.e. ring slot (pos + e) % M
        self.buffers = []
        with torch.no_grad():
            for gau, layer in zip(model.gaus, state.layers):
                H = gau.config.n_head
                rel, u, v = gau.position_terms(gau.w_r.weight.dtype)
                c = gau.quantizer.codebook().to(gau.w_r.weight.dtype)
                self.buffers.append(_GAUBuffers(
                    layer.keys.detach().roll(shift, 2), layer.values.detach().roll(shift, 2),
                    layer.codes.roll(shift, 2), layer.cache_count.detach().clone(), layer.cache_mean.detach().clone(),
                    torch.cat([gau.w_q.weight, gau.w_kvg.weight]).T.contiguous(), gau.w_o.weight.T.contiguous(),
                    torch.arange(H, device=c.device),
                    rel.contiguous(), u, v, c, c.square().sum(-1),
                ))

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens (B,) at position ``self.pos`` -> next-token logits (B, V); advances the state."""
        logits = self._step(self.model, self.buffers, tokens, self._pos)
        self._pos += 1
        self.pos += 1
        return logits

    def state(self) -> TransformerVQState:
        """The decoder's state as an ordinary (ordered) :class:`TransformerVQState`."""
        shift = -(self.pos % self.model.config.mem_len)
        return TransformerVQState([
            LayerState(b.keys.roll(shift, 2), b.values.roll(shift, 2), b.codes.roll(shift, 2),
                       b.count.clone(), b.mean.clone())
            for b in self.buffers
        ], self.pos)


def _model_step(model, buffers: list[_GAUBuffers], tokens: Tensor, pos: Tensor) -> Tensor:
    x = model.embed(tokens)[:, None]  # (B, 1, D)
    for gau, buf in zip(model.gaus, buffers):
        x = _gau_step(gau, buf, x, pos)
    return model._logits(x)[:, 0]


def _rms(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _gau_step(gau: GAU, buf: _GAUBuffers, x: Tensor, pos: Tensor) -> Tensor:
    """One token at position ``pos`` (0-d tensor) through one GAU, updating its buffers in place."""
    cfg = gau.config
    B = x.shape[0]
    H, Dk, Dv, M = cfg.n_head, cfg.d_k, cfg.d_v, cfg.mem_len
    scale = Dk**-0.25
    h = torch.addcmul(gau.norm.bias, _rms(x, cfg.norm_eps), gau.norm.weight)  # (B, 1, D)
    q, k, v, g = (h[:, 0] @ buf.w_in).split([H * Dk, H * Dk, H * Dv, H * Dv], -1)
    q = _rms(q.view(B, H, Dk), cfg.norm_eps) * scale  # (B, H, D_k)
    k = _rms(k.view(B, H, Dk), cfg.norm_eps) * scale  # (B, H, D_k)
    v = F.silu(v).view(B, H, Dv)  # (B, H, D_v)

    z = (buf.c_sq - 2 * torch.einsum("bhk,hsk->bhs", k, buf.codebook)).argmin(-1)  # (B, H)
    k_hat = buf.codebook[buf.heads, z]  # (B, H, D_k)

    qu, qv = q + buf.u, q + buf.v
    rel_scores = torch.einsum("bhk,hdk->bhd", qv, buf.rel)  # (B, H, M + 1) by distance
    slot = torch.arange(M, device=x.device)
    dist = (pos - 1 - slot) % M + 1  # (M,) distance of the position in each ring slot, 1..M
    win = (buf.keys @ qu[..., None]).squeeze(-1) + rel_scores[..., dist]  # (B, H, M)
    win = win.masked_fill(dist > pos, float("-inf"))  # slots before the sequence start
    own = (qu * k_hat).sum(-1, keepdim=True) + rel_scores[..., :1]  # (B, H, 1)
    parts = [win, own]
    if cfg.agg_cache:
        parts.append(torch.einsum("bhk,hsk->bhs", qu, buf.codebook) + cache_log_count(buf.count))
    acc = buf.mean.dtype
    probs = torch.softmax(torch.cat(parts, -1).to(acc), -1)  # (B, H, M + 1 [+ S])
    out = (probs[..., None, :M] @ buf.values.to(acc)).squeeze(-2) + probs[..., M:M + 1] * v  # (B, H, D_v)
    if cfg.agg_cache:
        out = out + (probs[..., None, M + 1:] @ buf.mean).squeeze(-2)

    # slot pos % M holds position pos - M: it leaves the window now (folded only once pos >= M)
    j = (pos % M).view(1)
    if cfg.agg_cache:
        z_old = buf.codes.index_select(2, j)  # (B, H, 1)
        leaving = (pos >= M).to(acc)  # 0-d: 1 once a key really leaves
        buf.count.scatter_add_(-1, z_old, leaving.expand(z_old.shape))
        idx = z_old[..., None].expand(-1, -1, -1, Dv)  # (B, H, 1, D_v)
        m_old = buf.mean.gather(2, idx)
        n_new = buf.count.gather(-1, z_old)[..., None].clamp_min(1.0)  # (B, H, 1, 1)
        v_old = buf.values.index_select(2, j).to(acc)  # (B, H, 1, D_v)
        buf.mean.scatter_(2, idx, m_old + leaving * (v_old - m_old) / n_new)
    buf.keys.index_copy_(2, j, k_hat[:, :, None])
    buf.values.index_copy_(2, j, v[:, :, None].to(buf.values.dtype))
    buf.codes.index_copy_(2, j, z[:, :, None])

    res = (out.to(x.dtype).reshape(B, H * Dv) * F.silu(g)) @ buf.w_out  # (B, D)
    return x + res[:, None]
