"""Token-by-token decoding at constant cost: ring-buffer windows and an in-place cache.

``TransformerVQ.forward`` with a one-token chunk already costs O(M + S) per token, but it
rebuilds the window (a concatenation of M keys) and recomputes per-layer constants on every
call. :class:`VQDecoder` holds the state of all attention sublayers in a few stacked buffers instead: slot
``p % M`` of each window holds position p, and the window's keys and values sit next to the
codebook and the cache means, so one product scores the window and the cache and one reads them.

A step is a pure function of plain tensors (the weights, fixed in eval mode, and the state),
which is what ``compile=True`` compiles: it returns the logits and, per sublayer, the new key, value
and code and the cache entry the leaving key changes. The decoder then writes those few rows
in place, for all sublayers at once, in the same function (:func:`_decode_step_`, one CUDA graph with ``cuda_graph=True``).
It computes exactly what the blockwise path computes for a one-token chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from tvq.layers.norm import rms_norm
from tvq.ops.cache import cache_log_count
from tvq.state import LayerState, TransformerVQState


@dataclass(frozen=True)
class _Dims:
    n_head: int  # key/value heads
    n_q_head: int
    gated: bool
    d_k: int
    d_v: int
    mem_len: int
    agg_cache: bool
    eps: float
    logit_scale: float


@dataclass
class _AttentionWeights:
    """One attention sublayer's weights in the layout a step wants (eval mode: no dropout, codebook fixed).
    H is its key/value heads, H_q its query heads."""

    norm_w: Tensor | None  # (D,) input norm gain (None: no gain or bias, mha/mqa)
    norm_b: Tensor | None  # (D,) input norm bias
    w_in: Tensor      # (D, H_q D_k + H (D_k + D_v) [+ H_q D_v]) fused [W_q; W_k; W_v; W_g], transposed
    w_out: Tensor     # (H_q D_v, D) W_o transposed
    heads: Tensor     # (H,) arange, for codeword look-up
    rel: Tensor       # (H, M + 1, D_k) relative embeddings of distances 0..M
    u: Tensor         # (H_q, D_k)
    v: Tensor         # (H_q, D_k)
    codebook: Tensor  # (H, S, D_k)
    c_sq: Tensor      # (H, S) squared codeword norms
    cache_bias: Tensor | None = None  # (H_q, 1) config.cache_bias: added to the cache's log counts


@dataclass
class _MLPWeights:
    """One MLP sublayer's weights (mha/mqa), transposed for row-vector products."""

    w_1: Tensor  # (D, d_ff)
    w_2: Tensor  # (d_ff, D)


@dataclass
class _Weights:
    embed: Tensor              # (V, D)
    attns: list[_AttentionWeights]
    norm_f: tuple[Tensor, Tensor] | None  # final norm gain and bias (D,)
    head_w: Tensor             # (V, D) in at least float32
    head_b: Tensor | None      # (V,)
    mlps: list[_MLPWeights] | None = None  # mha/mqa: the MLP after each attention sublayer


class VQDecoder:
    """One-token steps from a :class:`TransformerVQState` (``attention="vq"`` models, eval mode)."""

    def __init__(self, model, state: TransformerVQState, compile: bool = False, cuda_graph: bool = False):
        if model.config.attention != "vq":
            raise ValueError("VQDecoder needs attention='vq'; the dense baseline decodes with model(ids, state=...)")
        cfg = model.config
        self.config, self.pos, self.start = cfg, state.pos, state.start  # start (B,): left padding, or None
        device = model.embed.weight.device
        self._pos = torch.tensor(state.pos, device=device)  # 0-d: no recompiles
        self._dims = _Dims(cfg.n_kv_head, cfg.n_q_head, cfg.gated, cfg.d_k, cfg.head_d_v, cfg.mem_len, cfg.agg_cache, cfg.norm_eps,
                           cfg.logit_scale)
        # torch.compile fuses the ~40 small ops of each sublayer's step (worth it for long generations:
        # compiling takes 15-20 s on a CPU); on a CPU the C++ wrapper also takes the Python
        # launcher out of every step
        self._step = _model_step
        if compile:
            cpp = {"cpp_wrapper": True} if device.type == "cpu" else None
            self._step = torch.compile(_model_step, fullgraph=True, options=cpp)
        M, B = cfg.mem_len, state.batch_size
        shift = state.pos % M  # ordered slot e holds position pos - M + e, i.e. ring slot (pos + e) % M
        attns, keys, values, codes, counts = [], [], [], [], []
        with torch.no_grad():
            for attn, layer in zip(model.attns, state.layers):
                rel, u, v = attn.position_terms(attn.w_r.weight.dtype)
                c = attn.quantizer.codebook().to(attn.w_r.weight.dtype)  # (H, S, D_k)
                attns.append(_AttentionWeights(
                    attn.norm.weight, attn.norm.bias,
                    torch.cat([attn.w_q.weight, attn.w_kvg.weight]).T.contiguous(), attn.w_o.weight.T.contiguous(),
                    torch.arange(cfg.n_kv_head, device=device), rel.contiguous(), u, v, c, c.square().sum(-1),
                    None if attn.cache_bias is None else attn.cache_bias.to(layer.cache_count.dtype)[:, None],
                ))
                acc = layer.cache_mean.dtype  # values are read in it, like the blockwise path does
                keys.append(torch.cat([layer.keys.detach().roll(shift, 2).to(c.dtype), c.expand(B, -1, -1, -1)], 2))
                values.append(torch.cat([layer.values.detach().roll(shift, 2).to(acc), layer.cache_mean.detach()], 2))
                codes.append(layer.codes.roll(shift, 2))
                counts.append(layer.cache_count.detach())
            acc = torch.promote_types(model.embed.weight.dtype, torch.float32)
            head = model.embed if model.lm_head is None else model.lm_head
            self._weights = _Weights(
                model.embed.weight, attns,
                None if model.norm_f is None else (model.norm_f.weight, model.norm_f.bias),
                head.weight.to(acc), None if model.lm_head is None else model.lm_head.bias.to(acc),
                None if model.mlps is None else [_MLPWeights(m.w_1.weight.T.contiguous(), m.w_2.weight.T.contiguous())
                                                 for m in model.mlps],
            )
        self._value_dtype = state.layers[0].values.dtype
        self.keys = torch.stack(keys)        # (G, B, H, M + S, D_k): the window ring, then the codebook
        self.values = torch.stack(values)    # (G, B, H, M + S, D_v): the window ring, then the cache means
        self.codes = torch.stack(codes)      # (G, B, H, M)
        self.count = torch.stack(counts)     # (G, B, H, S)
        self.log_count = cache_log_count(self.count)  # (G, B, H, S)
        self._graph = None
        if cuda_graph:  # untested here (no GPU): captures _decode_step_ once; step() then replays it
            if device.type != "cuda":
                raise ValueError("cuda_graph=True needs the model on a CUDA device")
            self._capture(torch.zeros(B, dtype=torch.long, device=device))

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens (B,) at position ``self.pos`` -> next-token logits (B, V); advances the state."""
        if self._graph is not None:
            self._tokens.copy_(tokens)
            self._graph.replay()
            self.pos += 1
            return self._logits.clone()
        logits = _decode_step_(self._step, self._dims, self._weights, self.keys, self.values, self.codes, self.count,
                               self.log_count, tokens, self._pos, self.start)
        self.pos += 1
        return logits

    def _capture(self, tokens: Tensor) -> None:
        """Capture one step (model step, state write, position advance) in a CUDA graph: every tensor it
        touches has a fixed address (the buffers, the weights, ``self._pos``, the token buffer)."""
        self._tokens = tokens.clone()
        args = (self._dims, self._weights, self.keys, self.values, self.codes, self.count, self.log_count)
        snapshot = [t.clone() for t in (self.keys, self.values, self.codes, self.count, self.log_count, self._pos)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up (allocator, lazy init) off the capture
            for _ in range(2):
                _decode_step_(self._step, *args, self._tokens, self._pos, self.start)
        torch.cuda.current_stream().wait_stream(stream)
        for buf, old in zip((self.keys, self.values, self.codes, self.count, self.log_count, self._pos), snapshot):
            buf.copy_(old)  # undo the warm-up steps
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph), torch.no_grad():
            self._logits = _decode_step_(self._step, *args, self._tokens, self._pos, self.start)
        for buf, old in zip((self.keys, self.values, self.codes, self.count, self.log_count, self._pos), snapshot):
            buf.copy_(old)  # capture does not run the kernels, but keep the state exact either way

    def state(self) -> TransformerVQState:
        """The decoder's state as an ordinary (ordered) :class:`TransformerVQState`."""
        M = self.config.mem_len
        shift = -(self.pos % M)
        return TransformerVQState([
            LayerState(self.keys[g, ..., :M, :].roll(shift, 2),
                       self.values[g, ..., :M, :].roll(shift, 2).to(self._value_dtype),
                       self.codes[g].roll(shift, 2), self.count[g].clone(), self.values[g, ..., M:, :].clone())
            for g in range(len(self._weights.attns))
        ], self.pos, self.start)


def _decode_step_(model_step, dims: _Dims, w: _Weights, keys: Tensor, values: Tensor, codes: Tensor, count: Tensor,
                  log_count: Tensor, tokens: Tensor, pos: Tensor, start: Tensor | None = None) -> Tensor:
    """One decode step that mutates the state in place: logits (B, V) of ``tokens`` at ``pos`` (0-d),
    then the new key, value and code into ring slot pos % M, the leaving key's cache entry, and pos + 1.
    Only index_copy_/scatter_ with tensor indices: no Python value changes per step and no host sync,
    so a CUDA graph can capture it (``model_step`` is :func:`_model_step`, possibly compiled)."""
    logits, k_hat, v, z, z_old, n, log_n, mean = model_step(dims, w, keys, values, codes, count, log_count, tokens,
                                                            pos, start)
    M = dims.mem_len
    j = (pos % M).view(1)
    if dims.agg_cache:  # before a real key leaves, the entry written back is the unchanged one
        count.scatter_(-1, z_old, n)
        log_count.scatter_(-1, z_old, log_n)
        values[..., M:, :].scatter_(3, z_old[..., None].expand_as(mean), mean)
    keys.index_copy_(3, j, k_hat[..., None, :].to(keys.dtype))
    values.index_copy_(3, j, v[..., None, :].to(values.dtype))
    codes.index_copy_(3, j, z[..., None].to(codes.dtype))
    pos.add_(1)
    return logits


def _model_step(dims: _Dims, w: _Weights, keys: Tensor, values: Tensor, codes: Tensor, count: Tensor,
                log_count: Tensor, tokens: Tensor, pos: Tensor, start: Tensor | None = None) -> tuple[Tensor, ...]:
    """Logits (B, V) of ``tokens`` (B,) at ``pos`` (0-d), and each attention sublayer's updates, stacked (see
    :func:`_decode_step_`); ``start`` (B,): each row's first real position, or None. Reads the state,
    writes nothing."""
    x = w.embed[tokens]  # (B, D)
    updates = []
    for g, aw in enumerate(w.attns):
        x, *update = _attention_step(dims, aw, keys[g], values[g], codes[g], count[g], log_count[g], x, pos, start)
        if w.mlps is not None:  # mha / mqa: each attention sublayer is followed by an MLP
            x = _mlp_step(dims, w.mlps[g], x)
        updates.append(update)
    if w.norm_f is not None:
        x = rms_norm(x, dims.eps, *w.norm_f)
    logits = F.linear(x.to(w.head_w.dtype), w.head_w, w.head_b) * dims.logit_scale  # (B, V)
    return logits, *(torch.stack(t) for t in zip(*updates))


def _seen(pos: Tensor, start: Tensor | None, ndim: int) -> Tensor:
    """Real tokens before the one at ``pos`` (0-d): ``pos`` itself, or per row ``pos - start`` shaped
    (B, 1, ...) with ``ndim`` dimensions (negative while a row is still in its left padding)."""
    return pos if start is None else (pos - start).view(-1, *(1,) * (ndim - 1))


def _leaving_entry(M: int, values: Tensor, codes: Tensor, count: Tensor, pos: Tensor, seen: Tensor):
    """The cache entry changed by the key in ring slot pos % M (position pos - M), which leaves the window
    after this step, if it is a real one (seen >= M: 0-d or (B, 1, 1)): its code (B, H, 1), the code's new
    count and log count (B, H, 1) and mean (B, H, 1, D_v). values (B, H, M + S, D_v): ring, then means."""
    B, H, _, Dv = values.shape
    leaving = (seen >= M).to(values.dtype)  # 0-d or (B, 1, 1): 1 once a real key leaves
    lv = leaving if leaving.dim() == 0 else leaving[..., None]  # broadcasts against (B, H, 1, D_v)
    j = (pos % M).view(1)
    z_old = codes.index_select(2, j)  # (B, H, 1)
    n_new = count.gather(-1, z_old) + leaving  # (B, H, 1)
    m_old = values[..., M:, :].gather(2, z_old[..., None].expand(B, H, 1, Dv))  # (B, H, 1, D_v)
    m_new = m_old + lv * (values.index_select(2, j) - m_old) / n_new.clamp_min(1.0)[..., None]
    return z_old, n_new, cache_log_count(n_new), m_new


def _attention_step(dims: _Dims, w: _AttentionWeights, keys: Tensor, values: Tensor, codes: Tensor, count: Tensor,
                    log_count: Tensor, x: Tensor, pos: Tensor, start: Tensor | None = None) -> tuple[Tensor, ...]:
    """One token at position ``pos`` (0-d) through one attention sublayer, from its state without changing
    it. With ``start`` (B,), row b's positions before start[b] are left padding: hidden, never cached.

    H = ``dims.n_head`` key/value heads, each read by G = H_q / H query heads (G = 1 for shga and mha, H = 1
    for mqa). keys (B, H, M + S, D_k) and values (B, H, M + S, D_v): the window ring, then the codebook and
    the cache means; codes (B, H, M); count and log_count (B, H, S). Returns x (B, D), the token's
    quantized key (B, H, D_k), value (B, H, D_v) and code (B, H), and the cache entry of the key leaving
    the window: code (B, H, 1), count and log count (B, H, 1), mean (B, H, 1, D_v).
    """
    B = x.shape[0]
    H, Dk, Dv, M = dims.n_head, dims.d_k, dims.d_v, dims.mem_len
    G = dims.n_q_head // H
    scale = Dk**-0.25
    h = rms_norm(x, dims.eps, w.norm_w, w.norm_b)  # (B, D)
    q, k, v, *g = (h @ w.w_in).split([H * G * Dk, H * Dk, H * Dv] + ([H * G * Dv] if dims.gated else []), -1)
    q = rms_norm(q.view(B, H, G, Dk), dims.eps) * scale  # (B, H, G, D_k): query head h G + g
    k = rms_norm(k.view(B, H, Dk), dims.eps) * scale  # (B, H, D_k)
    v = (F.silu(v) if dims.gated else v).view(B, H, Dv)  # (B, H, D_v)

    z = (w.c_sq - 2 * torch.einsum("bhk,hsk->bhs", k, w.codebook)).argmin(-1)  # (B, H)
    k_hat = w.codebook[w.heads, z]  # (B, H, D_k)

    qu, qv = q + w.u.view(H, G, Dk), q + w.v.view(H, G, Dk)  # (B, H, G, D_k)
    rel_scores = torch.einsum("bhgk,hdk->bhgd", qv, w.rel)  # (B, H, G, M + 1) by distance
    dist = (pos - 1 - torch.arange(M, device=x.device)) % M + 1  # (M,) distance of each ring slot, 1..M
    bias = rel_scores[..., dist].masked_fill(dist > _seen(pos, start, 4), float("-inf"))  # (B, H, G, M)
    n_read = M  # slots attended to: the window [and the codebook]
    if dims.agg_cache:
        cache = log_count[:, :, None]  # (B, H, 1, S): one cache per key/value head
        if w.cache_bias is not None:  # (H_q, 1): one offset per query head
            cache = cache + w.cache_bias.view(H, G, 1)
        bias = torch.cat([bias, cache.expand(B, H, G, -1)], -1)  # (B, H, G, M + S): codeword scores + log counts
        n_read = keys.shape[-2]
    scores = qu @ keys[..., :n_read, :].transpose(-1, -2) + bias  # (B, H, G, n_read)
    own = (qu * k_hat[:, :, None]).sum(-1, keepdim=True) + rel_scores[..., :1]  # (B, H, G, 1)
    probs = torch.softmax(torch.cat([scores, own], -1).to(values.dtype), -1)  # (B, H, G, n_read + 1)
    if B * H * G == 1:  # a row-vector product (BLAS) rather than a batched one
        read = (probs.view(1, -1)[:, :n_read] @ values.view(-1, Dv)[:n_read]).view(B, H, G, Dv)
    else:
        read = probs[..., :n_read] @ values[..., :n_read, :]  # (B, H, G, D_v)
    out = (read + probs[..., n_read:] * v[:, :, None]).to(x.dtype).reshape(B, H * G * Dv)  # (B, H_q D_v)
    if dims.gated:
        out = out * F.silu(g[0])
    x = x + out @ w.w_out  # (B, D)

    return x, k_hat, v, z, *_leaving_entry(M, values, codes, count, pos, _seen(pos, start, 3))


def _mlp_step(dims: _Dims, w: _MLPWeights, x: Tensor) -> Tensor:
    """One token (B, D) through an MLP sublayer: x + relu(norm(x) W_1)^2 W_2."""
    return x + F.relu(rms_norm(x, dims.eps) @ w.w_1).square() @ w.w_2
