"""Transformer-VQ: a decoder-only stack of attention sublayers (the paper's GAUs, or mha/mqa attention each
followed by an MLP) with vector-quantized keys."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from tvq.config import TransformerVQConfig
from tvq.layers.attention import Attention, is_dtensor
from tvq.layers.mlp import MLP
from tvq.layers.norm import RMSNorm
from tvq.layers.vq import add_statistics, apply_updates, checkpointed, recomputing
from tvq.ops.kernels import kernels_enabled
from tvq.ops.linear import precast_weights
from tvq.sampling import sample_next
from tvq.state import TransformerVQState, zero_states

IGNORE_INDEX = -100


def _recompute_quietly():
    """Contexts of activation checkpointing's forward and of its recomputation in backward."""
    return checkpointed(), recomputing()


@dataclass
class TransformerVQOutput:
    """What a forward pass returns.

    logits (B, T, V) in float32 (float64 under ``.double()``); ``state`` continues the
    sequences; with ``labels``, ``loss = lm_loss + commit_weight * commit_loss``.
    """

    logits: Tensor
    state: TransformerVQState
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    commit_loss: Tensor | None = None


# State-dict keys of tvq before its attention sublayers became one module (tvq.layers.attention): the
# sublayers were ``gaus.N``, and the fused key/value projection of mha/mqa ``w_kv``. Patterns (regular
# expressions) and their replacements; the Hugging Face model loads old folders with the same table.
LEGACY_KEY_RENAMES = {r"gaus\.": "attns.", r"\.w_kv\.weight": ".w_kvg.weight"}


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook: old keys renamed in place (parameters kept their order, so optimizer
    states saved with them load too)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = key
        for pattern, replacement in LEGACY_KEY_RENAMES.items():
            new = re.sub(pattern, replacement, new)
        if new != key:
            state_dict[new] = state_dict.pop(key)


class TransformerVQ(nn.Module):
    """Transformer-VQ language model (Lingle, ICLR 2024).

    ``model(input_ids, state=None, labels=None, token_mask=None)``:

    - input_ids (B, T) integer token ids, any T >= 1;
    - state: a :class:`TransformerVQState` from a previous call, to continue the same sequences;
    - labels (B, T): the target of each position (already shifted: usually the next token),
      ``-100`` to ignore a position;
    - token_mask (B, T) bool: False for padding, whose keys then stay out of the codebook
      statistics and the commitment loss. Use it for right padding: the real positions' logits are
      exact by causality, and the state then holds the padding as if it were input (continuing it
      continues the padded rows);
    - left_pad (B,) ints >= 0, with a new state only: row b's first ``left_pad[b]`` positions are
      padding. They are never attended, never enter the cache, the codebook statistics or the
      commitment loss, and their labels are ignored, so each row computes exactly what it computes
      alone. The state keeps each row's start (:attr:`TransformerVQState.start`) for later calls;
    - context: a :class:`tvq.parallel.ContextParallel` when input_ids is this rank's chunk of segments split
      over the ranks of a group (``state``: the segments' carried state, the same on every rank). The logits
      are the chunk's, the losses and the returned state the whole segments', exactly as one process's.

    In training mode forwards accumulate codebook statistics; call :meth:`update_codebooks`
    once per optimizer step.
    """

    CPU_SEGMENT_TOKENS = 8192  # at most batch x tokens per segment of a CPU inference forward (see _segment_len)

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop_emb = nn.Dropout(config.dropout_emb)
        # the attention sublayers, each with a state; mha / mqa follow each with an MLP sublayer
        self.attns = nn.ModuleList(Attention(config) for _ in range(config.n_attn))
        self.mlps = None if config.gated else nn.ModuleList(MLP(config) for _ in range(config.n_attn))
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)
        self.norm_f = RMSNorm(config.d_model, config.norm_eps) if config.final_norm else None
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=1.0)
        for layer in [*self.attns, *(self.mlps or ())]:
            layer.reset_parameters()
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=self.config.d_model**-0.5)
            nn.init.zeros_(self.lm_head.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ state
    def initial_state(self, batch_size: int) -> TransformerVQState:
        """The empty state: nothing seen yet. Keys and values in the compute dtype (the autocast dtype where
        autocast is on, else the parameters'), the cache in float32 or wider; one zero fill per dtype for all the
        sublayers (:func:`tvq.state.zero_states`)."""
        shapes = [a.initial_state(batch_size, self.compute_dtype(), "meta") for a in self.attns]
        return TransformerVQState(zero_states(shapes, self.embed.weight.device), 0)

    def compute_dtype(self) -> torch.dtype:
        """The dtype products run in here and now: autocast's where it is on for the model's device, else the
        parameters'."""
        p = self.embed.weight
        return torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype

    def _check_left_pad(self, left_pad, batch_size: int) -> Tensor | None:
        """left_pad as the state's per-row starts: (B,) long, or None when no row is padded."""
        if left_pad is None:
            return None
        if (not isinstance(left_pad, Tensor) or left_pad.shape != (batch_size,) or left_pad.dtype == torch.bool
                or left_pad.is_floating_point() or left_pad.is_complex()):
            raise ValueError(f"left_pad must be an integer tensor of shape ({batch_size},), one count per row")
        if torch.compiler.is_compiling():
            return left_pad.long().to(self.embed.weight.device)
        if left_pad.device.type != "cpu":  # checked on the device without waiting for it; no shortcut
            torch._assert_async((left_pad >= 0).all(), "left_pad must be >= 0")
            return left_pad.long().to(self.embed.weight.device)
        if left_pad.numel() and int(left_pad.min()) < 0:
            raise ValueError(f"left_pad must be >= 0, got {left_pad.tolist()}")
        if not left_pad.any():  # nothing padded: the unpadded path, no per-row work
            return None
        return left_pad.long().to(self.embed.weight.device)

    def _check_state(self, state: TransformerVQState, batch_size: int) -> None:
        cfg = self.config
        if not isinstance(state, TransformerVQState):
            raise ValueError(f"state must be a TransformerVQState, got {type(state).__name__}")
        if len(state.layers) != cfg.n_attn:
            raise ValueError(f"state has {len(state.layers)} layers but the model has {cfg.n_attn} attention layers "
                             "(a state from another config?)")
        if state.batch_size != batch_size:
            raise ValueError(f"state is for batch size {state.batch_size} but input_ids has batch size {batch_size}")
        if state.start is not None and (not isinstance(state.start, Tensor) or state.start.dtype != torch.long
                                        or tuple(state.start.shape) != (batch_size,)):
            raise ValueError(f"state.start must be a long tensor of shape ({batch_size},) or None")
        B, H, Dv = batch_size, cfg.n_kv_head, cfg.head_d_v
        window = state.pos if cfg.attention == "full" else cfg.mem_len
        expect = {"keys": (B, H, window, cfg.d_k), "values": (B, H, window, Dv)}
        if cfg.attention == "vq":
            expect.update(codes=(B, H, window), cache_count=(B, H, cfg.n_code),
                          cache_mean=(B, H, cfg.n_code, Dv))
        for i, layer in enumerate(state.layers):
            for name, shape in expect.items():
                t = getattr(layer, name)
                if t is None or tuple(t.shape) != shape:
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(f"state.layers[{i}].{name} has shape {got}, expected {shape} "
                                     "(a state from another config?)")

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor,
        state: TransformerVQState | None = None,
        labels: Tensor | None = None,
        token_mask: Tensor | None = None,
        left_pad: Tensor | None = None,
        context=None,
    ) -> TransformerVQOutput:
        input_ids = self._check_ids(input_ids, "input_ids")
        B, T = input_ids.shape
        offset = 0  # the position of this call's first token after the state's
        if context is not None:
            self.config.check_context_chunk(T)
            offset = context.rank * T
        if left_pad is not None and state is not None:
            raise ValueError("left_pad starts new sequences: pass it without a state (the state keeps its rows' starts)")
        if state is None:
            state = self.initial_state(B)
            state.start = self._check_left_pad(left_pad, B)
        else:
            self._check_state(state, B)
        if token_mask is not None:
            if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool or token_mask.shape != (B, T):
                raise ValueError(f"token_mask must be a bool tensor of shape {(B, T)}")
        if state.start is not None:  # left padding: no codebook statistics, commitment loss or labels there
            first = state.pos + offset
            real = torch.arange(first, first + T, device=input_ids.device) >= state.start[:, None]  # (B, T)
            token_mask = real if token_mask is None else token_mask & real
            if labels is not None and isinstance(labels, Tensor) and labels.shape == (B, T):
                labels = labels.masked_fill(~real, IGNORE_INDEX)

        seg = T if context is not None else self._segment_len(input_ids)
        if seg < T:  # CPU inference: segment by segment through all layers, carrying the state
            logits, commit, weight = [], 0.0, 0
            for lo in range(0, T, seg):
                mask = None if token_mask is None else token_mask[:, lo: lo + seg]
                seg_logits, state, seg_commit = self._run(input_ids[:, lo: lo + seg], state, mask)
                n = seg_logits.shape[1] if mask is None else int(mask.sum())  # tokens in the commitment mean
                logits.append(seg_logits)
                commit, weight = commit + seg_commit * n, weight + n
            logits, commit = torch.cat(logits, 1), commit / max(weight, 1)
        else:
            logits, state, commit = self._run(input_ids, state, token_mask, context)
        out = TransformerVQOutput(logits, state, commit_loss=commit)
        if labels is not None:
            labels = self._check_ids(labels, "labels", shape=(B, T), allow_ignore=True)
        if context is not None:  # the whole segments' losses: sums over the ranks
            out.lm_loss, out.commit_loss = context.reduce_losses(logits, labels, commit, token_mask, IGNORE_INDEX)
        elif labels is not None:
            out.lm_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        if labels is not None:
            out.loss = out.lm_loss + self.config.commit_weight * out.commit_loss
        return out

    def _run(self, input_ids: Tensor, state: TransformerVQState, token_mask: Tensor | None, context=None):
        """Embed, run the attention (and MLP) sublayers, read out: -> (logits (B, T, V), new state, commitment loss)."""
        x = self.drop_emb(self.embed(input_ids))  # (B, T, D)
        pos = state.pos + (0 if context is None else context.rank * input_ids.shape[1])  # of the first token
        layers, commits = [], []
        recompute = self.config.grad_checkpoint and self.training and torch.is_grad_enabled()
        casts = self._precast(x)
        next_norms = self._next_norms(x)
        h = None  # the next sublayer's normalized input, where the previous one wrote it with its residual add
        for i, (attn, layer_state) in enumerate(zip(self.attns, state.layers)):
            args = (x, layer_state, pos, token_mask, state.start, context, casts[i], h, next_norms[i])
            if recompute:  # keep only each sublayer's inputs; backward runs it again (same dropout masks)
                # eager backward re-runs the Python forward: tell the quantizer not to count its codes
                # twice; a compiled graph recomputes inside the graph (and takes no context_fn)
                quiet = {} if torch.compiler.is_compiling() else {"context_fn": _recompute_quietly}
                out = checkpoint(attn, *args, use_reentrant=False, **quiet)
            else:
                out = attn(*args)
            x, new_layer_state, layer_commit = out[:3]
            h = out[3] if next_norms[i] is not None else None
            if self.mlps is not None:  # mha / mqa: the layer's MLP sublayer
                x = checkpoint(self.mlps[i], x, use_reentrant=False) if recompute else self.mlps[i](x)
            layers.append(new_layer_state)
            commits.append(layer_commit)
        # one sum of the sublayers' commitment losses (not an add per sublayer: a launch each on a GPU)
        commit = torch.stack(commits).sum().to(torch.promote_types(x.dtype, torch.float32))
        add_statistics(self._quantizers())  # this forward's codebook statistics (if any), all sublayers in one batch
        T = input_ids.shape[1] * (1 if context is None else context.size)  # tokens of the new state
        return self._logits(x), TransformerVQState(layers, state.pos + T, state.start), commit

    def _next_norms(self, x: Tensor) -> list[RMSNorm | None]:
        """For each attention sublayer, the next one's norm where the two are joined (its residual add and the next
        pre-norm in one kernel each way, :func:`tvq.layers.residual.add_residual_norm`), else None: on the Triton path
        (elsewhere the norm stays in its sublayer, as it would compute the same), between consecutive attention
        sublayers (an MLP comes between them for mha / mqa), for a plain norm (no hooks, which its kernel would
        skip) whose weights are not FSDP2's shards (DTensors until their own sublayer gathers them)."""
        nexts: list[RMSNorm | None] = [None] * len(self.attns)
        if self.mlps is not None or not kernels_enabled(x) or torch.compiler.is_compiling():
            return nexts
        for i, nxt in enumerate(self.attns[1:]):
            norm = nxt.norm
            if (type(norm) is RMSNorm and not (norm._forward_hooks or norm._forward_pre_hooks)
                    and not any(is_dtensor(p) for p in norm.parameters())):
                nexts[i] = norm
        return nexts

    def _precast(self, x: Tensor) -> list[tuple[Tensor, ...] | None]:
        """Each attention sublayer's weights cast for the Triton path (:meth:`tvq.layers.attention.Attention.
        cast_plan`), all in one multi-tensor copy per dtype (a launch per forward where each sublayer's own would be
        one per sublayer; each sublayer's backward writes its weights' gradients in their dtype as they arrive); None
        for a sublayer that casts none."""
        plans = [attn.cast_plan(x) for attn in self.attns]
        casts: list[tuple[Tensor, ...] | None] = [None] * len(plans)
        for dtype in {p[0] for p in plans if p is not None}:
            idx = [i for i, p in enumerate(plans) if p is not None and p[0] == dtype]
            for i, c in zip(idx, precast_weights([plans[i][1] for i in idx], dtype)):
                casts[i] = c
        return casts

    def _segment_len(self, input_ids: Tensor) -> int:
        """Tokens per segment of a forward: all of them, except in CPU inference (no autograd) of a VQ
        model, where segments of equal length in whole blocks, with batch x length at most about
        ``CPU_SEGMENT_TOKENS``, run one after the other. Carrying the state between segments is exact,
        and a long prompt is then read in memory bounded by the segment's, not the prompt's, length
        (bench-small, 32k tokens: 0.4 instead of 1.1 GiB). Speed on the 2-core CPU: the same with the
        ``tvq`` command's allocator settings (:mod:`tvq.runtime`), ~20% faster at 32k tokens without them
        (glibc then page-faults every large tensor back in). Not inside ``torch.compile``, whose graph would
        unroll the loop (8k tokens in 6 segments compiled in 70 s, against 6 s as one pass)."""
        B, T = input_ids.shape
        if (input_ids.device.type != "cpu" or torch.is_grad_enabled() or self.config.attention != "vq"
                or torch.compiler.is_compiling()):
            return T
        L = self.config.block_len
        n_seg = -(-B * T // self.CPU_SEGMENT_TOKENS)  # segments of equal length, in whole blocks
        return -(-T // (n_seg * L)) * L

    def _logits(self, x: Tensor) -> Tensor:
        if self.norm_f is not None:
            x = self.norm_f(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        bias = None if self.lm_head is None else self.lm_head.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), weight.to(dtype), bias)  # (B, T, V)
        return logits * self.config.logit_scale

    def _check_ids(self, ids, name: str, shape=None, allow_ignore: bool = False) -> Tensor:
        V = self.config.vocab_size
        if not isinstance(ids, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"{name} must have an integer dtype, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, time), got {tuple(ids.shape)}")
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"{name} is empty: shape {tuple(ids.shape)}; need batch >= 1 and time >= 1")
        if shape is not None and tuple(ids.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected {shape}")
        if torch.compiler.is_compiling():  # value checks need the data: they would break the graph
            return ids.long()
        bad = (ids < 0) | (ids >= V)  # (B, T)
        if allow_ignore:
            bad &= ids != IGNORE_INDEX
        if ids.device.type != "cpu":  # checked on the device, without waiting for it (a device-side assert)
            torch._assert_async(~bad.any(), f"{name} has ids outside [0, {V})")
        elif bad.any():
            check = ids[ids != IGNORE_INDEX] if allow_ignore else ids
            raise ValueError(f"{name} has ids outside [0, {V}): min {int(check.min())}, max {int(check.max())}")
        return ids.long()

    # --------------------------------------------------------------- codebooks
    def _quantizers(self):
        return [a.quantizer for a in self.attns if a.quantizer is not None]

    def codebook_stats(self) -> Tensor:
        """All codebook statistics gathered since the last update, as one flat vector."""
        quantizers = self._quantizers()
        if not quantizers:
            return self.embed.weight.new_zeros(0)
        add_statistics(quantizers)
        return torch.cat([q._stats for q in quantizers])

    @torch.no_grad()
    def update_codebooks(self, all_reduce: Callable[[Tensor], object] | None = None) -> Mapping[str, float]:
        """Apply the accumulated codebook statistics: one EMA step per optimizer step.

        ``all_reduce`` receives one flat tensor of every sublayer's statistics and must sum it in
        place across data-parallel ranks (e.g. ``torch.distributed.all_reduce``), so that all
        ranks apply the update of the global batch. Returns health metrics averaged over sublayers:
        ``usage`` (fraction of codes assigned this step), ``dead`` (fraction with EMA count < 1),
        ``entropy`` (of code usage, divided by log S), ``rel_err`` (||k - k_hat|| / ||k||), as a
        :class:`~tvq.layers.vq.CodebookMetrics` that reads them from the device when first looked at:
        the update itself never waits for the device (k-means initialisation aside, once). In train mode it
        also counts the step for the cache warm-up (``config.cache_warmup``, not in the paper).
        """
        if self.training:  # the cache warm-up counts training steps (config.cache_warmup, not in the paper)
            for attn in self.attns:
                attn.tick_warmup()
        quantizers = self._quantizers()
        if not quantizers:
            return {}
        flat = self.codebook_stats()
        if all_reduce is not None:
            all_reduce(flat)
        return apply_updates(quantizers, list(flat.split([q.stats_numel for q in quantizers])), all_reduce)

    # -------------------------------------------------------------- generation
    def decoder(self, state: TransformerVQState, compile: bool = False, cuda_graph: bool = False,
                dtype: torch.dtype | None = None):
        """A :class:`~tvq.models.decoding.VQDecoder` continuing ``state`` one token at a time
        (``attention="vq"``; put the model in eval mode). ``compile=True`` fuses the step with
        torch.compile: 15-60 s to compile on a CPU, then about 4x faster per token. ``cuda_graph=True`` (CUDA
        only, else a ValueError) captures the whole step, state write included, in one CUDA graph replayed per
        token. ``dtype``: the step's compute dtype (None: the autocast dtype under autocast, else the
        parameters')."""
        from tvq.models.decoding import VQDecoder

        self._check_state(state, state.batch_size)
        return VQDecoder(self, state, compile=compile, cuda_graph=cuda_graph, dtype=dtype)

    @torch.no_grad()
    def stream(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        state: TransformerVQState | None = None,
        compile: bool = False,
        left_pad: Tensor | None = None,
        cuda_graph: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[Tensor]:
        """Yield sampled tokens (B,) one at a time; the state has constant size per step.

        The prompt is read with the blockwise path, then each new token costs one step of a
        :class:`~tvq.models.decoding.VQDecoder` (O(mem_len + n_code), in-place state).
        Runs in eval mode (no dropout, no codebook statistics). ``compile=True`` compiles the
        decode step (worth it for long samples: 15-20 s once, then about 4x faster per token on a CPU).
        ``left_pad`` (B,): left-padded prompts of different lengths (see :meth:`forward`). ``cuda_graph``:
        each token one CUDA graph replay (None: on where the model is on a CUDA device); ``dtype``: the decode
        step's compute dtype (see :meth:`decoder`).
        """
        if cuda_graph and self.config.attention != "vq":
            raise ValueError("cuda_graph=True needs attention='vq' (the dense baseline decodes with the forward)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        was_training = self.training
        self.eval()
        try:
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.embed.weight.device).manual_seed(seed)
            out = self(input_ids, state=state, left_pad=left_pad)
            logits, state = out.logits[:, -1], out.state
            decoder = None
            if self.config.attention == "vq":
                from tvq.models.decoding import default_cuda_graph

                graph = default_cuda_graph(self.embed.weight.device) if cuda_graph is None else cuda_graph
                decoder = self.decoder(state, compile=compile, cuda_graph=graph, dtype=dtype)
            for i in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                yield token
                if i + 1 == max_new_tokens:
                    break
                if decoder is not None:
                    logits = decoder.step(token)
                else:
                    out = self(token[:, None], state=state)
                    logits, state = out.logits[:, -1], out.state
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        compile: bool = False,
        left_pad: Tensor | None = None,
        cuda_graph: bool | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` continuations -> (B, T + max_new_tokens) token ids (``compile``,
        ``left_pad``, ``cuda_graph``, ``dtype``: see :meth:`stream`)."""
        tokens = list(self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, compile=compile,
                                  left_pad=left_pad, cuda_graph=cuda_graph, dtype=dtype))
        new = torch.stack(tokens, 1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.cat([input_ids.long(), new], 1)
