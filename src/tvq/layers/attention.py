"""The attention sublayer of every head type (docs/spec.md section 1).

One module computes the paper's single-head gated attention unit (``head_type="shga"``, the GAU) and the
official optimized code's ``"mha"`` / ``"mqa"`` sublayers. They differ in a few config-driven places
(``config.gated``, ``config.n_q_head``, ``config.n_kv_head``, ``config.head_d_v``):

- shga: H query heads and H key/value heads of values D_v wide; SiLU values, a SiLU gate on the output, a
  pre-norm with gain and bias;
- mha / mqa: d_model / d_k query heads, values d_k wide, no gate, linear values, a pre-norm without gain
  or bias; one key/value head per query head (mha) or a single one shared by all (mqa: one codebook and
  one cache per sublayer).

Keys are quantized per key/value head. The attention ops take one key/value head per query head: an mqa
sublayer passes its keys, values, codes, cache and relative embeddings expanded over the query heads
(views), while its state keeps the one head.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tvq.config import TransformerVQConfig
from tvq.layers.host_flags import HostFlags
from tvq.layers.norm import RMSNorm
from tvq.layers.position import SinusoidTable
from tvq.layers.residual import add_residual, add_residual_norm
from tvq.layers.vq import VectorQuantizer
from tvq.ops import blockwise_attention, dense_attention, quadratic_attention
from tvq.ops.cache import advance_state, join_window
from tvq.ops.kernels import graph_capturing, kernels_enabled
from tvq.ops.linear import cast_linear, cast_weights, fused_linear_ok, linear
from tvq.state import LayerState, empty_slots


def per_query_head(t: Tensor, n_q_head: int, dim: int = 1) -> Tensor:
    """t with n_kv key/value heads on ``dim`` -> n_q_head heads: itself (shga, mha) or its one head expanded
    (mqa, a view)."""
    if t.shape[dim] == n_q_head:
        return t
    shape = list(t.shape)
    shape[dim] = n_q_head
    return t.expand(shape)


def is_dtensor(t: Tensor) -> bool:
    """Whether t is a DTensor (e.g. an FSDP2-sharded parameter); none exists unless their module was imported (which
    takes half a second: not done here)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class Attention(HostFlags):
    """x + LayerDrop(Dropout((Attn(q, k, v) [* g]) W_o)), pre-norm.

    q = norm(x W_q) D_k^-1/4 (H_q heads), k = norm(x W_k) D_k^-1/4 (H_kv heads, no gain or bias),
    v = act(x W_v) (H_kv heads; act SiLU when gated, else none), g = SiLU(x W_g) when gated;
    Transformer-XL relative biases (embeddings per key/value head, u and v per query head). With
    ``attention="vq"`` keys are quantized against one codebook per key/value head.
    """

    @staticmethod
    def projections(config: TransformerVQConfig) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection: the one place their widths are defined (the memory
        estimate of :mod:`tvq.training.memory` reads them too)."""
        D, Dk, Dv, Hq, Hkv = config.d_model, config.d_k, config.head_d_v, config.n_q_head, config.n_kv_head
        return {
            "w_q": (D, Hq * Dk),
            "w_kvg": (D, Hkv * (Dk + Dv) + (Hq * Dv if config.gated else 0)),  # fused [W_k; W_v; W_g]
            "w_r": (D, Hkv * Dk),  # relative position embeddings
            "w_o": (Hq * Dv, D),
        }

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        self.config = config
        Dk, Hq, Hkv = config.d_k, config.n_q_head, config.n_kv_head
        self.norm = RMSNorm(config.d_model, config.norm_eps, affine=config.gated)
        self.qk_norm = RMSNorm(Dk, config.norm_eps, affine=False)
        shapes = self.projections(config)
        self.w_q = nn.Linear(*shapes["w_q"], bias=False)
        self.w_kvg = nn.Linear(*shapes["w_kvg"], bias=False)
        self.w_r = nn.Linear(*shapes["w_r"], bias=False)
        self.w_o = nn.Linear(*shapes["w_o"], bias=False)
        self.xl_u = nn.Parameter(torch.zeros(Hq, Dk))
        self.xl_v = nn.Parameter(torch.zeros(Hq, Dk))
        self.quantizer = (
            VectorQuantizer(Hkv, config.n_code, Dk, config.codebook_decay, config.codebook_init,
                            config.codebook_revive) if config.attention == "vq" else None
        )
        # not in the paper: a learned offset of each query head's cache scores (config.cache_bias)
        use_bias = config.attention == "vq" and config.agg_cache and config.cache_bias  # no cache, no offset
        self.cache_bias = nn.Parameter(torch.zeros(Hq)) if use_bias else None
        # not in the paper: the cache ignored for the first config.cache_warmup optimizer steps. The count is a
        # saved buffer (only with a warm-up, so older checkpoints load as before), advanced by tick_warmup();
        # forward reads a host flag, so it never waits for the device
        self.warmup = config.cache_warmup if config.attention == "vq" and config.agg_cache else 0
        if self.warmup:
            self.register_buffer("warmup_steps", torch.tensor(0))
            self._set_host("warmup_steps", 0)
            self._warming = True
        self.drop_sin = nn.Dropout(config.dropout_sin)
        # (M + 1, D) in the model's dtype; scaled() by D_k^-1/4 as q and k are (position_terms)
        self.sin = SinusoidTable(config.mem_len + 1, config.d_model, config.rel_pos_base, config.d_k**-0.25)

    def reset_parameters(self) -> None:
        """Paper initialisation: fan-in scaled normal kernels; zero u, v and norm bias."""
        for lin in (self.w_q, self.w_kvg, self.w_r, self.w_o):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
        nn.init.zeros_(self.xl_u)
        nn.init.zeros_(self.xl_v)
        if self.norm.weight is not None:
            nn.init.ones_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)
        if self.cache_bias is not None:
            nn.init.constant_(self.cache_bias, self.config.cache_bias_init)

    def tick_warmup(self) -> None:
        """One optimizer step of the cache warm-up (config.cache_warmup; called by
        :meth:`tvq.TransformerVQ.update_codebooks` in train mode). No read-back of the device."""
        if self.warmup:
            count = self._host("warmup_steps", int) + 1
            self.warmup_steps += 1
            self._set_host("warmup_steps", count)
            self._warming = count < self.warmup

    def uses_cache(self) -> bool:
        """Whether attention uses the cache now: ``config.agg_cache``, and the warm-up (if any) is over. The same
        in train and eval mode, so that validation during the warm-up measures the model being trained."""
        if not self.warmup:
            return self.config.agg_cache
        if not torch.compiler.is_compiling():  # a compiled graph uses the flag as it is (one recompile at the end)
            self._warming = self._host("warmup_steps", int) < self.warmup
        return not self._warming

    def position_terms(self, dtype: torch.dtype, w_r: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Relative embeddings of distances 0..M per key/value head (H_kv, M + 1, D_k) and the biases u, v
        per query head (H_q, D_k), all scaled by D_k^-1/4 like q and k (sinusoid dropout in training), in
        ``dtype`` (the compute dtype: q + u then stays in it, with no cast of the (B, H, T, D_k) sums); ``w_r`` as
        in :meth:`relative_embeddings`."""
        u, v = (torch.stack([self.xl_u, self.xl_v]) * self.config.d_k**-0.25).to(dtype)  # (H_q, D_k) each
        return self.relative_embeddings(dtype, w_r), u, v

    def relative_embeddings(self, dtype: torch.dtype, w_r: Tensor | None = None) -> Tensor:
        """:meth:`position_terms`' relative embeddings alone, the sinusoid table read in ``dtype``; ``w_r`` the
        projection's weight already cast (:meth:`_cast_weights`), else the module runs; with it, in training with
        sinusoid dropout, the dropout and the GEMM are one kernel each way (:mod:`tvq.ops.kernels.dropout_linear`)."""
        cfg = self.config
        Hkv, Dk, M = cfg.n_kv_head, cfg.d_k, cfg.mem_len
        table = self.sin.scaled(dtype)  # (M + 1, D), the scale in the table
        p = self.drop_sin.p if self.training else 0.0
        if w_r is not None and 0.0 < p < 1.0 and not torch.compiler.is_compiling() and not graph_capturing(table):
            from tvq.ops.kernels.dropout_linear import dropout_linear_kernel

            # the Triton path: the mask drawn inside the GEMM, each way (one launch forward instead of two); op by
            # op under compile or while a CUDA graph is captured (a host-drawn seed, as the residual kernel's)
            rel = dropout_linear_kernel(table, w_r, p, master=self._master(w_r, self.w_r))  # (M + 1, H_kv D_k)
        else:
            sin = self.drop_sin(table)
            rel = self.w_r(sin) if w_r is None else self._cast_linear(sin, w_r, self.w_r)  # (M + 1, H_kv D_k)
        return rel.view(M + 1, Hkv, Dk).transpose(0, 1)  # (H_kv, M + 1, D_k)

    def initial_state(self, batch_size: int, dtype: torch.dtype, device) -> LayerState:
        """The empty state, one key/value head per codebook (see :class:`tvq.state.LayerState`)."""
        cfg = self.config
        B, Hkv, M, Dk, Dv = batch_size, cfg.n_kv_head, cfg.mem_len, cfg.d_k, cfg.head_d_v
        if cfg.attention == "full":
            return LayerState(torch.zeros(B, Hkv, 0, Dk, dtype=dtype, device=device),
                              torch.zeros(B, Hkv, 0, Dv, dtype=dtype, device=device))
        acc = torch.promote_types(dtype, torch.float32)
        return LayerState(
            keys=torch.zeros(B, Hkv, M, Dk, dtype=dtype, device=device),
            values=torch.zeros(B, Hkv, M, Dv, dtype=dtype, device=device),
            codes=torch.zeros(B, Hkv, M, dtype=torch.long, device=device),
            cache_count=torch.zeros(B, Hkv, cfg.n_code, dtype=acc, device=device),
            cache_mean=torch.zeros(B, Hkv, cfg.n_code, Dv, dtype=acc, device=device),
        )

    def forward(
        self, x: Tensor, state: LayerState, pos: int, token_mask: Tensor | None = None,
        start: Tensor | None = None, context=None, cast: tuple[Tensor, ...] | None = None,
        normed: Tensor | None = None, next_norm: RMSNorm | None = None,
    ) -> tuple[Tensor, LayerState, Tensor] | tuple[Tensor, LayerState, Tensor, Tensor]:
        """x (B, T, D) at positions pos..pos+T-1 -> (x', new state, commitment loss), and with ``next_norm`` the
        next sublayer's normalized input.

        ``token_mask`` (B, T) bool: False for padding (kept out of the codebook statistics); ``start`` (B,)
        long: each row's first real position (left padding before it), or None (0). ``context``: a
        :class:`tvq.parallel.ContextParallel` when x is one rank's chunk of a sequence split over ranks (``state``
        is then the segment's carried state, and the new state the whole segment's). ``cast``: this sublayer's
        weights already cast for the Triton path (:meth:`cast_plan`; the model casts every sublayer's in one
        launch), else (None) cast here where that path runs. ``next_norm``: the next pre-norm sublayer's norm, applied
        to x' with the residual add (:func:`tvq.layers.residual.add_residual_norm`: one kernel each way on the Triton
        path) and its output returned as a fourth element, for the next sublayer's ``normed`` (its norm then
        skipped: x its residual stream as returned here)."""
        cfg = self.config
        B, T, _ = x.shape
        Hq, Hkv, Dk, Dv, M = cfg.n_q_head, cfg.n_kv_head, cfg.d_k, cfg.head_d_v, cfg.mem_len
        scale = Dk**-0.25

        # under autocast the norm writes the projections' input in the compute dtype once
        amp = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if normed is None:  # (B, T, D); x's two gradients joined in the norm's
            h, x = self.norm(x, out_dtype=amp, residual=True)
        else:  # written by the previous sublayer with its residual add
            h = normed
        # the Triton path: the weights cast (and q's and k/v/g's joined) in one launch, their gradients written in
        # their own dtype by the GEMMs
        w_proj, w_o, w_r = self._cast_weights(h.dtype, cast) if self._joined_path(h) else (None, None, None)
        q, k, v, g, fused = self._projections(h, w_proj)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H_q, T, D_k), (B, H_kv, T, D_k)
        v = v.view(B, T, Hkv, Dv).transpose(1, 2)  # (B, H_kv, T, D_v)
        if self.quantizer is not None:  # u and v as they are: the VQ attention scales them and adds them to q
            rel, u, vb = self.relative_embeddings(h.dtype, w_r), self.xl_u, self.xl_v  # (one kernel on the GPU path)
        else:
            rel, u, vb = self.position_terms(h.dtype, w_r)  # (H_kv, M + 1, D_k), (H_q, D_k), (H_q, D_k)
        rel = per_query_head(rel, Hq, 0)  # (H_q, M + 1, D_k)

        if self.quantizer is None:
            commit = x.new_zeros(())
            keys = torch.cat([state.keys.to(k.dtype), k], 2)  # (B, H_kv, pos + T, D_k)
            values = torch.cat([state.values.to(v.dtype), v], 2)  # (B, H_kv, pos + T, D_v)
            attn = dense_attention(q, per_query_head(keys, Hq), per_query_head(values, Hq), rel=rel, u=u, v=vb,
                                   mem_len=M, chunk=cfg.block_len, start=start)
            new_state = LayerState(keys, values)
        else:
            quant = self.quantizer(k, token_mask)
            commit = quant.commit
            if context is not None:  # the state at the start of this rank's chunk, and after the segment
                state, quant, v, segment_state = context.exchange(state, quant, v, pos, start, cfg)
            n_invalid = empty_slots(M, pos, start)  # int or (B,)
            use_cache = self.uses_cache()
            blockwise = cfg.attn_impl != "quadratic"
            # the key list in the compute dtype: (B, H_kv, M + T, D_k), (B, H_kv, M + T, D_v), (B, H_kv, M + T), and
            # for the blockwise path reading the cache each block's counts (B, H_kv, nb, S) (one launch for all)
            keys, values, codes, block_count = join_window(
                state, quant.keys, v, quant.codes, block_len=cfg.block_len if blockwise and use_cache else None,
                n_invalid=n_invalid)
            # the codebook in the compute dtype, cast once per update (VectorQuantizer.codebook), not per forward
            cache = (per_query_head(self.quantizer.codebook(q.dtype), Hq, 0),  # (H_q, S, D_k)
                     per_query_head(state.cache_count, Hq),  # (B, H_q, S)
                     per_query_head(state.cache_mean, Hq))  # (B, H_q, S, D_v)
            extra = {}
            if not blockwise:
                attend = quadratic_attention
            else:
                attend = blockwise_attention
                extra["block_count"] = None if block_count is None else per_query_head(block_count, Hq)
                if g is not None and not fused and kernels_enabled(h):  # g before its SiLU: the value kernels
                    extra["gate"], g = g.view(B, T, Hq, Dv).transpose(1, 2), None  # apply it (B, H_q, T, D_v)
                # the scan reading the cache may also write the state's (one head per query head, float32)
                extra["fold"] = (use_cache and context is None and Hq == Hkv
                                 and state.cache_count.dtype == state.cache_mean.dtype == torch.float32)
            attn = attend(q, per_query_head(keys, Hq), per_query_head(values, Hq),
                          per_query_head(codes, Hq), n_invalid=n_invalid, rel=rel, u=u, v=vb, mem_len=M,
                          block_len=cfg.block_len, agg_cache=use_cache, grad_thru_cache=cfg.grad_thru_cache,
                          cache=cache, straight_through=cfg.straight_through, cache_bias=self.cache_bias,
                          uv_scale=scale, **extra)
            attn, folded = attn if extra.get("fold") else (attn, None)
            if not use_cache and self.cache_bias is not None:  # cache warm-up: keep the unused offset in the
                attn = attn + 0.0 * self.cache_bias.sum()  # graph (a zero gradient; DDP wants every parameter)
            new_state = segment_state if context is not None else advance_state(
                state, keys, values, codes, n_invalid, n_code=cfg.n_code, agg_cache=cfg.agg_cache,
                grad_thru_cache=cfg.grad_thru_cache, folded=folded)

        out = attn.transpose(1, 2).reshape(B, T, Hq * Dv)  # (B, T, H_q D_v)
        if g is not None and not fused and kernels_enabled(h):  # g before its SiLU (_projections): one kernel
            from tvq.ops.kernels.gate import silu_gate

            out = silu_gate(out, g)
        elif g is not None:
            out = out * g
        if fused and not self.training:  # no dropout or LayerDrop: the residual add joins the GEMM
            x = linear(out, self.w_o.weight, residual=x)
            if next_norm is None:
                return x, new_state, commit
            h_next, x = next_norm(x, out_dtype=amp, residual=True)
            return x, new_state, commit, h_next
        res = self.w_o(out) if w_o is None else self._cast_linear(out, w_o, self.w_o)  # (B, T, D)
        if next_norm is None:
            return add_residual(x, res, cfg.dropout_res, cfg.layerdrop, self.training), new_state, commit
        x, h_next = add_residual_norm(x, res, cfg.dropout_res, cfg.layerdrop, self.training, next_norm, amp,
                                      kernel=not is_dtensor(next_norm.weight))  # (FSDP2: a shard until it runs)
        return x, new_state, commit, h_next

    def _joined_path(self, h: Tensor) -> bool:
        """Whether the projections run as one GEMM of joined weights (:meth:`_cast_weights`): the gated sublayer
        on the Triton path, its projections plain."""
        return self.config.gated and kernels_enabled(h) and self._plain_projections()

    def cast_plan(self, x: Tensor) -> tuple[torch.dtype, list[list[Tensor]]] | None:
        """(dtype, groups) of the weights :meth:`forward` would cast for input x on the Triton path (the joined
        projection's, then w_o's and w_r's where not already in that dtype), or None where it casts none: what
        :func:`tvq.ops.linear.precast_weights` casts ahead for it."""
        if not (self.config.gated and kernels_enabled(x)):  # (cheap on the other paths: no probe tensor made)
            return None  # (a float64 stream under autocast is cast by its sublayer: correct either way)
        amp = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        dtype = amp or (x.dtype if self.norm.weight is None else torch.promote_types(x.dtype, self.norm.weight.dtype))
        if not self._joined_path(x.new_empty(0, dtype=dtype)):
            return None
        groups = self._cast_groups(dtype)[0]
        if any(is_dtensor(w) for g in groups for w in g):  # FSDP2's shards, gathered only as the sublayer runs
            return None
        return dtype, groups

    def _cast_groups(self, dtype: torch.dtype) -> tuple[list[list[Tensor]], list[str]]:
        """The weight groups to cast to ``dtype`` (the joined projection's [W_q; W_kvg], then w_o and w_r each alone
        where not already in it) and the names of the single ones."""
        weights = {"o": self.w_o.weight, "r": self.w_r.weight}
        to_cast = [name for name, w in weights.items() if w.dtype != dtype]
        return [[self.w_q.weight, self.w_kvg.weight]] + [[weights[n]] for n in to_cast], to_cast

    def _cast_weights(self, dtype: torch.dtype, cast: tuple[Tensor, ...] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """The joined projection weight (n_q + n_k + n_v + n_g, D) in ``dtype``, and w_o's and w_r's weights in it
        too, without gradient: all written by one launch, where autocast would cast each weight apart (and each
        gradient back: here the GEMMs using the casts write the weights' gradients in their dtype, :meth:`_cast_linear`);
        ``cast`` already written (:meth:`cast_plan`). w_o and w_r are passed as they are where already in ``dtype``."""
        groups, to_cast = self._cast_groups(dtype)
        w_proj, *done = cast_weights(groups, dtype, cast)
        weights = {"o": self.w_o.weight, "r": self.w_r.weight}
        weights.update(zip(to_cast, done))
        return w_proj, weights["o"], weights["r"]

    @staticmethod
    def _master(w: Tensor, lin: nn.Linear) -> Tensor | None:
        """lin's weight where w is a cast of it (:meth:`_cast_weights`), None where w is that weight itself."""
        return None if w is lin.weight else lin.weight

    @staticmethod
    def _cast_linear(x: Tensor, w: Tensor, lin: nn.Linear) -> Tensor:
        """F.linear(x, w) for w lin's weight or its cast, the gradient going to lin's weight in its dtype."""
        return F.linear(x, w) if w is lin.weight else cast_linear(x, w, [lin.weight])

    def _projections(self, h: Tensor, w_proj: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool]:
        """q (B, T, H_q, D_k) and k (B, T, H_kv, D_k) through the query/key norm and times D_k^-1/4, v (B, T, H_kv
        D_v), g (B, T, H_q D_v) or None, and whether oneDNN's fused kernels ran (CPU inference: the activations
        applied inside the GEMM). On the Triton path (:func:`tvq.ops.kernels.kernels_enabled`) g is the gate BEFORE
        its SiLU (the gate's kernel applies it) and one kernel writes v's SiLU and the normalized heads, and in
        backward the whole projection's gradient (:mod:`tvq.ops.kernels.gate`); ``w_proj`` the joined weight of
        :meth:`_cast_weights` there (one GEMM for q too: h read once, its gradient written once, no add)."""
        cfg = self.config
        B, T, _ = h.shape
        Hq, Hkv, Dk = cfg.n_q_head, cfg.n_kv_head, cfg.d_k
        scale = Dk**-0.25
        n_k, n_v = Hkv * Dk, Hkv * cfg.head_d_v
        act = "silu" if cfg.gated else None
        fused = self._plain_projections() and fused_linear_ok(h, self.w_q.weight, self.w_kvg.weight, self.w_o.weight)
        if fused:
            w_kvg = self.w_kvg.weight
            q, k = linear(h, self.w_q.weight), linear(h, w_kvg[:n_k])
            vg = linear(h, w_kvg[n_k:], act=act)  # (B, T, H_kv D_v [+ H_q D_v])
        elif cfg.gated and kernels_enabled(h):
            from tvq.ops.kernels.gate import gau_activation

            norm = dict(head_dim=Dk, eps=self.qk_norm.eps, scale=scale)
            if w_proj is not None:  # the query and key heads side by side in one projection: one norm for both
                z = cast_linear(h, w_proj, [self.w_q.weight, self.w_kvg.weight])  # (B, T, n_q + n_k + n_v + n_g)
                # parts of one output, their gradients read apart (no cat); v written, g a view of z
                q, k, v, g = gau_activation(z, Hq * Dk + n_k, n_v, split=Hq, **norm)
                return q, k, v, g, False
            k, v, g = gau_activation(self.w_kvg(h), n_k, n_v, **norm)
            return self.qk_norm(self.w_q(h).view(B, T, Hq, Dk), scale=scale), k, v, g, False
        else:
            q = self.w_q(h)
            k, vg = self.w_kvg(h).split([n_k, self.w_kvg.out_features - n_k], -1)
            vg = F.silu(vg) if act else vg
        # split, not sliced: backward joins the two gradients in one pass
        v, g = vg.split([n_v, vg.shape[-1] - n_v], -1) if cfg.gated else (vg, None)
        q = self.qk_norm(q.view(B, T, Hq, Dk), scale=scale)  # (B, T, H_q, D_k)
        k = self.qk_norm(k.view(B, T, Hkv, Dk), scale=scale)  # (B, T, H_kv, D_k)
        return q, k, v, g, fused

    def _plain_projections(self) -> bool:
        """Whether the projections are plain ``nn.Linear`` without hooks, so that the fused path, which
        reads their weights directly, computes what their forwards would (not so for, e.g., a LoRA or
        quantized replacement, or a hook)."""
        return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
                   for m in (self.w_q, self.w_kvg, self.w_r, self.w_o))
