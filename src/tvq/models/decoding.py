"""Token-by-token decoding at constant cost: ring-buffer windows and an in-place cache.

``TransformerVQ.forward`` with a one-token chunk already costs O(M + S) per token, but it
rebuilds the window (a concatenation of M keys) and recomputes per-layer constants on every
call. :class:`VQDecoder` holds the state of all attention sublayers in a few stacked buffers instead: slot
``p % M`` of each window holds position p, and the window's keys and values sit next to the
codebook and the cache means, so one product scores the window and the cache and one reads them.

A step (:func:`_model_step`) is a pure function of plain tensors (the weights, fixed in eval mode, and the
state): it returns the logits and, per sublayer, the new key, value and code and the cache entry the
leaving key changes. The decoder then writes those few rows in place, for all sublayers at once, in the
same function (:func:`_decode_step_`: what ``compile=True`` compiles and ``cuda_graph=True`` captures).
In the model's own dtype it computes exactly what the blockwise path computes for a one-token chunk.

The decoder keeps the weights of its products and the key/value buffers in one compute dtype (``dtype``,
e.g. bfloat16), cast once when it is built, so that a step casts no weight and no buffer: only a few
activation rows (the normed input, q and k through their norms, the key for the float32 VQ distance,
the attention probabilities). Counts, means, the residual stream and the head stay in at least float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from tvq.layers.norm import rms_norm
from tvq.ops.cache import cache_log_count
from tvq.state import LayerState, TransformerVQState


_GRAPH_DEVICES = ("cuda",)  # where cuda_graph=True may capture (a CPU test adds "cpu" with a stand-in graph)


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
    read_cache: bool = True  # agg_cache and any cache warm-up (config.cache_warmup) over when the decoder was made


@dataclass
class _AttentionWeights:
    """One attention sublayer's weights in the layout a step wants (eval mode: no dropout, codebook fixed).
    H is its key/value heads, H_q its query heads. Products' weights in the compute dtype, norms' in at
    least float32."""

    norm_w: Tensor | None  # (D,) input norm gain (None: no gain or bias, mha/mqa)
    norm_b: Tensor | None  # (D,) input norm bias
    w_in: Tensor      # (D, H_q D_k + H (D_k + D_v) [+ H_q D_v]) fused [W_q; W_k; W_v; W_g], transposed
    w_out: Tensor     # (H_q D_v, D) W_o transposed
    heads: Tensor     # (H,) arange, for codeword look-up
    rel: Tensor       # (H, M + 1, D_k) relative embeddings of distances 0..M
    u: Tensor         # (H_q, D_k)
    v: Tensor         # (H_q, D_k)
    codebook: Tensor  # (H, S, D_k) in the compute dtype, for the quantized key
    c_dist: Tensor    # (H, S, D_k) in at least float32, for the VQ distance
    c_sq: Tensor      # (H, S) squared codeword norms, in c_dist's dtype
    cache_bias: Tensor | None = None  # (H_q, 1) config.cache_bias: added to the cache's log counts


@dataclass
class _MLPWeights:
    """One MLP sublayer's weights (mha/mqa), transposed for row-vector products."""

    w_1: Tensor  # (D, d_ff)
    w_2: Tensor  # (d_ff, D)


@dataclass
class _Weights:
    embed: Tensor              # (V, D) the model's own (a row is cast per token)
    attns: list[_AttentionWeights]
    norm_f: tuple[Tensor, Tensor] | None  # final norm gain and bias (D,)
    head_w: Tensor             # (V, D) in at least float32, like the forward's head
    head_b: Tensor | None      # (V,)
    mlps: list[_MLPWeights] | None = None  # mha/mqa: the MLP after each attention sublayer


class VQDecoder:
    """One-token steps from a :class:`TransformerVQState` (``attention="vq"`` models, eval mode).

    ``dtype``: the compute dtype of the step's products, in which the decoder keeps its copies of the
    weights and the key/value buffers (default: the autocast dtype when built under autocast, else the
    model's parameter dtype), so that no step casts a weight or a buffer; an autocast around ``step`` is
    ignored. The residual stream, norms, softmax, head, VQ distance and the cache's counts and means stay
    in at least float32: below float32 the means are kept in float32 and their compute-dtype copy next to
    the window ring is rewritten, one row per sublayer, at every step.
    ``cuda_graph=True`` (CUDA only) captures the step and its state write in one CUDA graph, replayed
    once per token.
    """

    def __init__(self, model, state: TransformerVQState, compile: bool = False, cuda_graph: bool = False,
                 dtype: torch.dtype | None = None):
        if model.config.attention != "vq":
            raise ValueError("VQDecoder needs attention='vq'; the dense baseline decodes with model(ids, state=...)")
        cfg = model.config
        self.config, self.pos = cfg, state.pos
        self.start = None if state.start is None else state.start.clone()  # (B,): left padding, or None
        device = model.embed.weight.device
        if cuda_graph and device.type not in _GRAPH_DEVICES:
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device.type}")
        param = model.embed.weight.dtype
        if dtype is None:
            dtype = model.compute_dtype()
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.dtype = dtype
        acc = torch.promote_types(dtype, torch.float32)  # residual stream, norms, softmax, head, cache sums
        dist = torch.promote_types(param, acc)  # the VQ distance, as the blockwise path computes it
        self._pos = torch.tensor(state.pos, device=device)  # 0-d: no recompiles
        self._dims = _Dims(cfg.n_kv_head, cfg.n_q_head, cfg.gated, cfg.d_k, cfg.head_d_v, cfg.mem_len, cfg.agg_cache, cfg.norm_eps,
                           cfg.logit_scale, all(a.uses_cache() for a in model.attns))
        # torch.compile fuses the step and its state write (the ~80 ops of each sublayer into ~7 kernels,
        # the rows written in place; worth it for long generations: compiling takes 15-60 s on a CPU); on a
        # CPU the C++ wrapper also takes the Python launcher out of every step
        self._decode = _decode_step_
        if compile:
            cpp = {"cpp_wrapper": True} if device.type == "cpu" else None
            self._decode = torch.compile(_decode_step_, fullgraph=True, options=cpp)
        M, B = cfg.mem_len, state.batch_size
        shift = state.pos % M  # ordered slot e holds position pos - M + e, i.e. ring slot (pos + e) % M
        first = state.layers[0]
        self._state_dtypes = (first.keys.dtype, first.values.dtype, first.cache_count.dtype, first.cache_mean.dtype)
        attns, keys, values, means, codes, counts = [], [], [], [], [], []
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # weights computed, then cast once
            for attn, layer in zip(model.attns, state.layers):
                rel, u, v = attn.position_terms(attn.w_r.weight.dtype)
                c = attn.quantizer.codebook()  # (H, S, D_k)
                c_dist = c.to(dist)
                attns.append(_AttentionWeights(
                    _to(attn.norm.weight, acc), _to(attn.norm.bias, acc),
                    torch.cat([attn.w_q.weight, attn.w_kvg.weight]).to(dtype).T.contiguous(),
                    attn.w_o.weight.to(dtype).T.contiguous(),
                    torch.arange(cfg.n_kv_head, device=device), rel.to(dtype).contiguous(), u.to(dtype), v.to(dtype),
                    c.to(dtype), c_dist, c_dist.square().sum(-1),
                    None if attn.cache_bias is None else attn.cache_bias.to(acc)[:, None],
                ))
                ring_k, ring_v = layer.keys.detach().roll(shift, 2), layer.values.detach().roll(shift, 2)
                keys.append(torch.cat([ring_k.to(dtype), c.to(dtype).expand(B, -1, -1, -1)], 2))
                values.append(torch.cat([ring_v.to(dtype), layer.cache_mean.detach().to(dtype)], 2))
                means.append(layer.cache_mean.detach().to(acc))
                codes.append(layer.codes.roll(shift, 2))
                counts.append(layer.cache_count.detach().to(acc))
            head = model.embed if model.lm_head is None else model.lm_head
            self._weights = _Weights(
                model.embed.weight, attns,
                None if model.norm_f is None else (_to(model.norm_f.weight, acc), _to(model.norm_f.bias, acc)),
                head.weight.to(acc), None if model.lm_head is None else _to(model.lm_head.bias, acc),
                None if model.mlps is None else [_MLPWeights(m.w_1.weight.to(dtype).T.contiguous(),
                                                             m.w_2.weight.to(dtype).T.contiguous())
                                                 for m in model.mlps],
            )
        self.keys = torch.stack(keys)        # (G, B, H, M + S, D_k): the window ring, then the codebook
        self.values = torch.stack(values)    # (G, B, H, M + S, D_v): the window ring, then the cache means
        # (G, B, H, S, D_v) the means in float32 where the compute dtype is narrower (else None: values holds them)
        self.means = None if dtype == acc else torch.stack(means)
        self.codes = torch.stack(codes)      # (G, B, H, M)
        self.count = torch.stack(counts)     # (G, B, H, S)
        self.log_count = cache_log_count(self.count)  # (G, B, H, S)
        self._tokens = torch.zeros(B, dtype=torch.long, device=device)  # (B,) the step's input, at a fixed address
        self._replay = None
        if cuda_graph:
            self._capture(_cuda_graph)

    @property
    def batch_size(self) -> int:
        return self._tokens.shape[0]

    def buffers(self) -> list[Tensor]:
        """The state the step reads and writes in place (fixed addresses), the position included."""
        bufs = [self.keys, self.values, self.means, self.codes, self.count, self.log_count, self._pos]
        return [b for b in bufs if b is not None] + ([] if self.start is None else [self.start])

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens (B,) or (B, 1) at position ``self.pos`` -> next-token logits (B, V); advances the state."""
        B = self.batch_size
        if tokens.shape not in ((B,), (B, 1)):
            raise ValueError(f"tokens must have shape ({B},) or ({B}, 1), got {tuple(tokens.shape)}")
        self._tokens.copy_(tokens.view(B))
        logits = self._step_() if self._replay is None else self._replay().clone()
        self.pos += 1
        return logits

    def _step_(self) -> Tensor:
        """One step from ``self._tokens``, the state written in place: only tensors at fixed addresses."""
        return self._decode(_model_step, self._dims, self._weights, self.keys, self.values, self.means, self.codes,
                            self.count, self.log_count, self._tokens, self._pos, self.start)

    @torch.no_grad()
    def select_rows_(self, rows: Tensor) -> None:
        """Keep the batch rows ``rows`` (B,) in order (a beam search's reordering), in place: the buffers keep
        their addresses, so a captured graph stays valid."""
        if rows.shape != (self.batch_size,):
            raise ValueError(f"select_rows_ keeps the batch size {self.batch_size}; got rows of shape "
                             f"{tuple(rows.shape)}")
        rows = rows.to(self._tokens.device)
        for buf in self.buffers():
            if buf.dim():
                dim = 0 if buf is self.start else 1
                buf.copy_(buf.index_select(dim, rows))

    def _capture(self, graph) -> None:
        """Warm the step up, capture it with ``graph`` (:func:`_cuda_graph`; a CPU test passes a stand-in
        with the same contract) and put the state back as it was; ``step`` then replays it."""
        snapshot = [b.clone() for b in self.buffers()]
        self._replay = graph(self._step_)
        for buf, old in zip(self.buffers(), snapshot):
            buf.copy_(old)  # undo the warm-up steps

    def state(self) -> TransformerVQState:
        """The decoder's state as an ordinary (ordered) :class:`TransformerVQState`, in its original dtypes."""
        M = self.config.mem_len
        shift = -(self.pos % M)
        kd, vd, nd, md = self._state_dtypes
        means = self.values[:, :, :, M:] if self.means is None else self.means  # (G, B, H, S, D_v)
        return TransformerVQState([
            LayerState(self.keys[g, ..., :M, :].roll(shift, 2).to(kd),
                       self.values[g, ..., :M, :].roll(shift, 2).to(vd),
                       self.codes[g].roll(shift, 2), self.count[g].to(nd, copy=True), means[g].to(md, copy=True))
            for g in range(len(self._weights.attns))
        ], self.pos, self.start)


def default_cuda_graph(device: torch.device) -> bool:
    """Whether ``generate`` decodes through a CUDA graph by default: where the model is on a CUDA device."""
    return device.type == "cuda" and torch.cuda.is_available()


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


@torch.no_grad()
def _cuda_graph(step_, warmup: int = 2):
    """Capture ``step_`` (no arguments; reads and writes only tensors at fixed addresses, returns the logits)
    in a CUDA graph after ``warmup`` runs on a side stream (lazy initialisation, allocator, autotuning)
    -> a function replaying it that returns the same logits tensor, rewritten by each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step_()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step_()  # (B, V), in the graph's memory pool

    def replay() -> Tensor:
        graph.replay()
        return logits

    return replay


def _decode_step_(model_step, dims: _Dims, w: _Weights, keys: Tensor, values: Tensor, means: Tensor | None,
                  codes: Tensor, count: Tensor, log_count: Tensor, tokens: Tensor, pos: Tensor,
                  start: Tensor | None = None) -> Tensor:
    """One decode step that mutates the state in place: logits (B, V) of ``tokens`` at ``pos`` (0-d),
    then the new key, value and code into ring slot pos % M, the leaving key's cache entry, and pos + 1.
    Only index_copy_/index_put_ with tensor indices: no Python value changes per step and no host sync,
    so a CUDA graph can capture it (``model_step`` is :func:`_model_step`; ``compile=True`` compiles this
    whole function, which inductor turns into in-place row writes). The buffers' dtypes decide the
    precision: an enclosing autocast is switched off."""
    with torch.autocast(tokens.device.type, enabled=False):
        logits, k_hat, v, z, z_old, n, log_n, mean = model_step(dims, w, keys, values, means, codes, count, log_count,
                                                                tokens, pos, start)
        M = dims.mem_len
        j = (pos % M).view(1)
        if dims.agg_cache:  # before a real key leaves, the entry written back is the unchanged one
            G, B, H = z_old.shape[:3]
            dev = z_old.device
            # (G, 1, 1), (1, B, 1), (1, 1, H), (G, B, H): one cache entry per sublayer, row and head. index_put_
            # on whole buffers (not scatter_ into a slice): a compiled step writes these rows in place
            at = (torch.arange(G, device=dev)[:, None, None], torch.arange(B, device=dev)[:, None],
                  torch.arange(H, device=dev), z_old[..., 0])
            count.index_put_(at, n[..., 0])
            log_count.index_put_(at, log_n[..., 0])
            values.index_put_((*at[:3], at[3] + M), mean[..., 0, :].to(values.dtype))
            if means is not None:  # the float32 means behind the compute-dtype copy
                means.index_put_(at, mean[..., 0, :])
        keys.index_copy_(3, j, k_hat[..., None, :])
        values.index_copy_(3, j, v[..., None, :])
        codes.index_copy_(3, j, z[..., None])
        pos.add_(1)
    return logits


def _model_step(dims: _Dims, w: _Weights, keys: Tensor, values: Tensor, means: Tensor | None, codes: Tensor,
                count: Tensor, log_count: Tensor, tokens: Tensor, pos: Tensor,
                start: Tensor | None = None) -> tuple[Tensor, ...]:
    """Logits (B, V) of ``tokens`` (B,) at ``pos`` (0-d), and each attention sublayer's updates, stacked (see
    :func:`_decode_step_`); ``start`` (B,): each row's first real position, or None. Reads the state,
    writes nothing."""
    acc = w.head_w.dtype  # at least float32
    x = w.embed[tokens].to(acc)  # (B, D) the residual stream
    updates = []
    for g, aw in enumerate(w.attns):
        x, *update = _attention_step(dims, aw, keys[g], values[g], None if means is None else means[g], codes[g],
                                     count[g], log_count[g], x, pos, start)
        if w.mlps is not None:  # mha / mqa: each attention sublayer is followed by an MLP
            x = _mlp_step(dims, w.mlps[g], x)
        updates.append(update)
    if w.norm_f is not None:
        x = rms_norm(x, dims.eps, *w.norm_f)
    logits = F.linear(x, w.head_w, w.head_b) * dims.logit_scale  # (B, V)
    return logits, *(torch.stack(t) for t in zip(*updates))


def _seen(pos: Tensor, start: Tensor | None, ndim: int) -> Tensor:
    """Real tokens before the one at ``pos`` (0-d): ``pos`` itself, or per row ``pos - start`` shaped
    (B, 1, ...) with ``ndim`` dimensions (negative while a row is still in its left padding)."""
    return pos if start is None else (pos - start).view(-1, *(1,) * (ndim - 1))


def _leaving_entry(M: int, values: Tensor, means: Tensor, codes: Tensor, count: Tensor, pos: Tensor, seen: Tensor):
    """The cache entry changed by the key in ring slot pos % M (position pos - M), which leaves the window
    after this step, if it is a real one (seen >= M: 0-d or (B, 1, 1)): its code (B, H, 1), the code's new
    count and log count (B, H, 1) and mean (B, H, 1, D_v), in the means' dtype. values (B, H, M + S, D_v):
    ring, then a copy of the means (B, H, S, D_v)."""
    B, H, _, Dv = values.shape
    leaving = (seen >= M).to(means.dtype)  # 0-d or (B, 1, 1): 1 once a real key leaves
    lv = leaving if leaving.dim() == 0 else leaving[..., None]  # broadcasts against (B, H, 1, D_v)
    j = (pos % M).view(1)
    z_old = codes.index_select(2, j)  # (B, H, 1)
    n_new = count.gather(-1, z_old) + leaving  # (B, H, 1)
    m_old = means.gather(2, z_old[..., None].expand(B, H, 1, Dv))  # (B, H, 1, D_v)
    m_new = m_old + lv * (values.index_select(2, j) - m_old) / n_new.clamp_min(1.0)[..., None]
    return z_old, n_new, cache_log_count(n_new), m_new


def _attention_step(dims: _Dims, w: _AttentionWeights, keys: Tensor, values: Tensor, means: Tensor | None,
                    codes: Tensor, count: Tensor, log_count: Tensor, x: Tensor, pos: Tensor,
                    start: Tensor | None = None) -> tuple[Tensor, ...]:
    """One token at position ``pos`` (0-d) through one attention sublayer, from its state without changing
    it. With ``start`` (B,), row b's positions before start[b] are left padding: hidden, never cached.

    H = ``dims.n_head`` key/value heads, each read by G = H_q / H query heads (G = 1 for shga and mha, H = 1
    for mqa). keys (B, H, M + S, D_k) and values (B, H, M + S, D_v), in the compute dtype: the window ring,
    then the codebook and the cache means; means (B, H, S, D_v) in at least float32, or None where values
    holds them in that dtype; codes (B, H, M); count and log_count (B, H, S). x (B, D): the residual stream,
    in at least float32. Returns x, the token's quantized key (B, H, D_k), value (B, H, D_v) and code
    (B, H), and the cache entry of the key leaving the window: code (B, H, 1), count and log count (B, H, 1),
    mean (B, H, 1, D_v).
    """
    B = x.shape[0]
    H, Dk, Dv, M = dims.n_head, dims.d_k, dims.d_v, dims.mem_len
    G = dims.n_q_head // H
    scale = Dk**-0.25
    dt = keys.dtype  # the compute dtype
    h = rms_norm(x, dims.eps, w.norm_w, w.norm_b).to(dt)  # (B, D)
    q, k, v, *g = (h @ w.w_in).split([H * G * Dk, H * Dk, H * Dv] + ([H * G * Dv] if dims.gated else []), -1)
    q = rms_norm(q.view(B, H, G, Dk), dims.eps) * scale  # (B, H, G, D_k): query head h G + g
    k = rms_norm(k.view(B, H, Dk), dims.eps) * scale  # (B, H, D_k)
    v = (F.silu(v) if dims.gated else v).view(B, H, Dv)  # (B, H, D_v)

    z = (w.c_sq - 2 * torch.einsum("bhk,hsk->bhs", k.to(w.c_dist.dtype), w.c_dist)).argmin(-1)  # (B, H)
    k_hat = w.codebook[w.heads, z]  # (B, H, D_k)

    qu, qv = q + w.u.view(H, G, Dk), q + w.v.view(H, G, Dk)  # (B, H, G, D_k)
    rel_scores = torch.einsum("bhgk,hdk->bhgd", qv, w.rel)  # (B, H, G, M + 1) by distance
    dist = (pos - 1 - torch.arange(M, device=x.device)) % M + 1  # (M,) distance of each ring slot, 1..M
    bias = rel_scores[..., dist].masked_fill(dist > _seen(pos, start, 4), float("-inf"))  # (B, H, G, M)
    n_read = M  # slots attended to: the window [and the codebook]
    if dims.read_cache:
        cache = log_count[:, :, None]  # (B, H, 1, S): one cache per key/value head
        if w.cache_bias is not None:  # (H_q, 1): one offset per query head
            cache = cache + w.cache_bias.view(H, G, 1)
        bias = torch.cat([bias, cache.expand(B, H, G, -1)], -1)  # (B, H, G, M + S): codeword scores + log counts
        n_read = keys.shape[-2]
    scores = qu @ keys[..., :n_read, :].transpose(-1, -2) + bias  # (B, H, G, n_read)
    own = (qu * k_hat[:, :, None]).sum(-1, keepdim=True) + rel_scores[..., :1]  # (B, H, G, 1)
    probs = torch.softmax(torch.cat([scores, own], -1), -1, dtype=x.dtype).to(dt)  # (B, H, G, n_read + 1)
    if B * H * G == 1:  # a row-vector product (BLAS) rather than a batched one
        read = (probs.view(1, -1)[:, :n_read] @ values.view(-1, Dv)[:n_read]).view(B, H, G, Dv)
    else:
        read = probs[..., :n_read] @ values[..., :n_read, :]  # (B, H, G, D_v)
    out = (read + probs[..., n_read:] * v[:, :, None]).reshape(B, H * G * Dv)  # (B, H_q D_v)
    if dims.gated:
        out = out * F.silu(g[0])
    x = x + out @ w.w_out  # (B, D)

    means = values[..., M:, :] if means is None else means  # (B, H, S, D_v)
    return x, k_hat, v, z, *_leaving_entry(M, values, means, codes, count, pos, _seen(pos, start, 3))


def _mlp_step(dims: _Dims, w: _MLPWeights, x: Tensor) -> Tensor:
    """One token (B, D) through an MLP sublayer: x + relu(norm(x) W_1)^2 W_2, the products in W's dtype."""
    return x + F.relu(rms_norm(x, dims.eps).to(w.w_1.dtype) @ w.w_1).square() @ w.w_2
