"""Context parallelism: one long sequence split over the C ranks of a process group, computed exactly.

Rank r of the group holds the contiguous chunk r of every row's segment (positions pos + r T ..
pos + (r + 1) T - 1, T tokens on every rank). What rank r needs from the ranks before it, per attention
sublayer, is its start state (docs/spec.md section 4): the window, the last M = ``mem_len`` keys, values and
codes before its chunk (all from rank r - 1, since T >= M), and the cache, the carried state's cache with the
per-code counts and value sums of every earlier key that has left the window folded in. So per sublayer one
all-gather of each rank's last M keys, values and codes and of the per-code statistics of its older keys
(O(M (D_k + D_v) + S D_v) per head, whatever T) gives every rank its start state and the state after the
whole segment; its backward (a reduce-scatter) returns the gradients of those tensors to the ranks that
produced them. Loss and commitment loss are reduced over the group (:meth:`ContextParallel.reduce_losses`).

Usage (every rank of ``group``; ``ids`` (B, C T) the whole segment, the same on every rank)::

    cp = ContextParallel(group)
    chunk = slice(cp.rank * T, (cp.rank + 1) * T)
    out = model(ids[:, chunk], state=state, labels=labels[:, chunk], context=cp)
    out.loss.backward()  # the whole segment's loss; each rank's gradients are C times its share
    for p in model.parameters():  # their mean over the group is one process's gradient
        dist.all_reduce(p.grad, group=group); p.grad /= cp.size
    model.update_codebooks(all_reduce=lambda t: dist.all_reduce(t, group=group))
    state = out.state.detach()  # the whole segment's state, the same on every rank
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

from tvq.config import TransformerVQConfig
from tvq.ops.cache import code_statistics, merge_cache
from tvq.state import LayerState


class _AllGather(torch.autograd.Function):
    """piece (n,) of each rank -> (C, n) on every rank; ``through`` tensors come back unchanged (views).

    They tie the node to this rank's own attention, so that every rank runs the backward's collective even
    where the gathered rows reach its loss nowhere (rank 0). Backward: each rank's piece gets the sum over
    ranks of the gradient of its row (one reduce-scatter).
    """

    @staticmethod
    def forward(ctx, group, piece, *through):
        ctx.group = group
        return (_gather(piece, group), *(t.view_as(t) for t in through))

    @staticmethod
    def backward(ctx, grad, *through_grads):
        out = grad.new_empty(grad.shape[1])  # (n,)
        dist.reduce_scatter_single(out, grad.contiguous().flatten(), group=ctx.group)
        return (None, out, *through_grads)


class _AllReduce(torch.autograd.Function):
    """The sum over ranks; its backward sums the gradients over ranks too."""

    @staticmethod
    def forward(ctx, group, t):
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return None, grad


def _gather(piece: Tensor, group) -> Tensor:
    """(n,) of each rank -> (C, n), no autograd."""
    out = piece.new_empty(dist.get_world_size(group) * piece.numel())
    dist.all_gather_single(out, piece.contiguous(), group=group)
    return out.view(-1, piece.numel())


def _real(first: int, n: int, start: Tensor | None, device) -> Tensor:
    """Which of positions first..first+n-1 hold a token (not before 0, nor before a row's ``start``):
    (n,) or, with ``start`` (B,), (B, 1, n)."""
    p = torch.arange(first, first + n, device=device)
    return p >= 0 if start is None else p >= start.clamp_min(0)[:, None, None]


def _pack(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.to(dtype).flatten() for t in parts])


def _unpack(rows: Tensor, like: list[Tensor]) -> list[Tensor]:
    """(C, n) -> per part of ``like``, (C, *part.shape)."""
    sizes = [t.numel() for t in like]
    return [r.view(rows.shape[0], *t.shape) for r, t in zip(rows.split(sizes, 1), like)]


class ContextParallel:
    """The ranks of ``group`` (default: the world) hold consecutive chunks of the same rows; pass it to
    ``TransformerVQ.forward(..., context=cp)`` on every rank of the group.

    The model's forward on rank r's chunk then computes exactly what one process computes on those
    positions of the whole segment: logits of its chunk, the whole segment's losses and its final state
    (the same on every rank), and after ``backward`` gradients whose mean over the group is one process's
    (C times its share on each rank, so that averaging over the ranks, as DDP does, gives the whole
    segment's). Codebook statistics are each rank's own: sum them over the group. Needs ``attention="vq"``,
    chunks of T >= ``mem_len`` tokens, the same T on every rank and, under ``straight_through="block"``,
    T a multiple of ``block_len`` (blocks then start where one process's do). Use a group of its own, not
    the one that DDP reduces gradients on: the backward's collectives and DDP's may interleave differently
    on different ranks. See docs/context_parallel.md.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise ValueError("ContextParallel needs an initialised torch.distributed process group")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("ContextParallel: this process is not a member of the group")
        self.size = dist.get_world_size(self.group)

    def exchange(self, state: LayerState, quant, values: Tensor, pos: int, start: Tensor | None,
                 config: TransformerVQConfig):
        """One attention sublayer's collective -> (the state at the start of this rank's chunk, quant and
        values to attend with, the state after the whole segment).

        ``state``: the carried state at the start of the segment; quant: this rank's quantized keys
        (B, H, T, D_k) and codes (B, H, T) (a :class:`tvq.layers.vq.Quantized`); values (B, H, T, D_v);
        ``pos``: the position of this rank's first token; ``start`` (B,) or None: the rows' first positions.
        """
        keys, codes = quant.keys, quant.codes
        B, H, T = codes.shape
        M, S, C, r = config.mem_len, config.n_code, self.size, self.rank
        pos0 = pos - r * T  # the segment's first position
        count0, mean0 = state.cache_count, state.cache_mean  # (B, H, S), (B, H, S, D_v)
        acc = mean0.dtype
        agg, thru = config.agg_cache, config.grad_thru_cache
        dev = codes.device

        # sent: the last M keys, values and codes; per code, the count and value sum of the older keys
        floats, longs = [keys[:, :, T - M:], values[:, :, T - M:]], [codes[:, :, T - M:]]
        if agg:
            older = values[:, :, : T - M] if thru else values[:, :, : T - M].detach()  # (B, H, T - M, D_v)
            n_old, s_old = code_statistics(codes[:, :, : T - M], older, _real(pos, T - M, start, dev), S, acc)
            floats.append(s_old)  # (B, H, S, D_v)
            longs.append(n_old.long())  # (B, H, S)
        piece = _pack(floats, acc)
        if torch.is_grad_enabled() and piece.requires_grad:
            rows, keys, values = _AllGather.apply(self.group, piece, keys, values)  # (C, n)
        else:
            rows = _gather(piece, self.group)
        got = _unpack(rows, floats)  # keys (C, B, H, M, D_k), values (C, B, H, M, D_v)[, sums (C, B, H, S, D_v)]
        got_long = _unpack(_gather(_pack(longs, torch.long), self.group), longs)  # codes (C, B, H, M)[, counts]

        def window(j: int) -> tuple[Tensor, Tensor, Tensor]:
            """The last M keys, values and codes of rank j (its successor's window)."""
            return got[0][j].to(keys.dtype), got[1][j].to(values.dtype), got_long[0][j]

        if agg:
            carried = state.values if thru else state.values.detach()  # (B, H, M, D_v)
            n_win, s_win = [], []  # per code, the keys of the carried window, then of each rank's window
            for codes_j, values_j, first in [(state.codes, carried, pos0 - M)] + [
                    (got_long[0][j], got[1][j] if thru else got[1][j].detach(), pos0 + (j + 1) * T - M)
                    for j in range(C - 1)]:
                n, s = code_statistics(codes_j, values_j, _real(first, M, start, dev), S, acc)
                n_win.append(n)
                s_win.append(s)

        def after(j: int) -> LayerState:
            """The state after ranks 0..j-1 (j >= 1): rank j - 1's window; the cache of every earlier key."""
            count, mean = count0, mean0
            if agg:  # keys that left the window: the carried window, ranks 0..j-1's older keys and all their
                # windows but the last
                n = sum(n_win[:j]) + got_long[1][:j].to(acc).sum(0)  # (B, H, S)
                s = sum(s_win[:j]) + got[2][:j].sum(0)  # (B, H, S, D_v)
                count, mean = merge_cache(count0, mean0, n, s)
            return LayerState(*window(j - 1), count, mean)

        first = state if r == 0 else after(r)
        return first, dataclasses.replace(quant, keys=keys), values, after(C)

    def reduce_losses(self, logits: Tensor, labels: Tensor | None, commit: Tensor, token_mask: Tensor | None,
                      ignore_index: int) -> tuple[Tensor | None, Tensor]:
        """The whole segment's mean cross-entropy (None without labels) and commitment loss, from this rank's
        logits (B, T, V), labels (B, T), commitment loss (the mean over its tokens, token_mask (B, T)) and
        those of the other ranks: one all-reduce, whose backward sums the gradients over ranks."""
        dtype = logits.dtype
        n_tok = logits.new_tensor(logits.shape[0] * logits.shape[1]) if token_mask is None \
            else token_mask.sum().to(dtype)
        ce = n_lab = logits.new_zeros(())
        if labels is not None:
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum")
            n_lab = (labels != ignore_index).sum().to(dtype)
        sums = torch.stack([ce, commit.to(dtype) * n_tok, n_lab, n_tok])
        ce, commit, n_lab, n_tok = _AllReduce.apply(self.group, sums)
        return (ce / n_lab if labels is not None else None), commit / n_tok.clamp_min(1.0)


def traffic(config: TransformerVQConfig, batch_size: int, segment_len: int, n_ranks: int,
            dtype_bytes: int = 2, cache_bytes: int = 4) -> dict[str, int]:
    """Bytes each rank sends per training step (forward and backward) with ``n_ranks`` ranks sharing segments
    of ``segment_len`` tokens of ``batch_size`` rows, counted for ring collectives (a rank sends C - 1 of the C
    pieces): ``"tvq"`` this module's exchange (pieces in the cache dtype, ``cache_bytes`` per number, codes
    and counts 8), against ``"ring"``: ring attention on the same shapes, whose every rank passes its keys
    and values (``dtype_bytes`` each) around the ring in the forward, and keys, values and their gradients in
    the backward. Loss reductions (4 numbers) are left out."""
    B, H, C = batch_size, config.n_kv_head, n_ranks
    M, S, Dk, Dv = config.mem_len, config.n_code, config.d_k, config.head_d_v
    cache = S if config.agg_cache else 0
    floats = B * H * (M * (Dk + Dv) + cache * Dv) * cache_bytes  # all-gathered, then reduce-scattered in backward
    longs = B * H * (M + cache) * 8  # codes and counts, forward only
    kv = B * H * (segment_len // C) * (Dk + Dv) * dtype_bytes  # one rank's chunk of keys and values
    return {"tvq": config.n_attn * (C - 1) * (2 * floats + longs), "ring": config.n_attn * (C - 1) * 3 * kv}
