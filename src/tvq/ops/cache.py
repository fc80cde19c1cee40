"""The compressive cache: per code, a count and a mean value of the keys it stands for."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def merge_cache(count: Tensor, mean: Tensor, add_count: Tensor, add_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``add_count`` keys whose values sum to ``add_sum`` into (count, mean).

    count (..., S), mean (..., S, D_v), add_count (..., S), add_sum (..., S, D_v), broadcastable.
    The mean is updated as mean + (sum - n * mean) / (count + n), which stays accurate in float32
    when count is large; a code with no keys keeps a mean that is never read (its score is -inf).
    """
    new_count = count + add_count
    new_mean = mean + (add_sum - add_count[..., None] * mean) / new_count.clamp_min(1.0)[..., None]
    return new_count, new_mean


def code_statistics(codes: Tensor, values: Tensor, valid: Tensor, n_code: int, dtype: torch.dtype):
    """Per-code counts (..., S) and value sums (..., S, D_v) of keys with codes (..., N).

    values (..., N, D_v); valid (bool, broadcastable to codes) is False for empty slots.
    One scatter-add (O(N D_v)) instead of a one-hot matmul (O(N S D_v)); empty slots go to a
    spare bucket that is dropped.
    """
    lead, S = codes.shape[:-1], n_code
    groups = math.prod(lead)
    offset = torch.arange(groups, device=codes.device).view(*lead, 1) * S
    idx = torch.where(valid, codes + offset, groups * S).flatten()  # (G N,), spare bucket G S
    counts = torch.zeros(groups * S + 1, dtype=dtype, device=codes.device)
    counts.index_add_(0, idx, torch.ones(idx.shape, dtype=dtype, device=codes.device))
    sums = torch.zeros(groups * S + 1, values.shape[-1], dtype=dtype, device=codes.device)
    sums.index_add_(0, idx, values.to(dtype).flatten(0, -2))  # in place: no copy of the zeros
    return counts[:-1].view(*lead, S), sums[:-1].view(*lead, S, values.shape[-1])


def block_cache_sums(codes: Tensor, values: Tensor, start: Tensor, first_valid: int = 0) -> Tensor:
    """Per block, the value sum of each code over every key in earlier blocks (the cache of SPEC 4).

    codes (P, nb, L) and values (P, nb, L, D_v) of nb blocks of L keys; start (P, S, D_v), in
    values' dtype, is what every sum starts from; keys before position ``first_valid`` (empty
    slots) are skipped. Returns (P, nb, S, D_v) with out[:, n, s] = start[:, s] + the sum of the
    values of keys in blocks 0..n-1 with code s. On a CPU it is one running sum, a copy and a
    scatter of L keys per block, instead of a zeroed (nb, S, D_v) tensor, a scatter and a prefix
    sum (~3x fewer passes over the largest tensor of the linear path); elsewhere a cumsum.
    """
    P, nb, L = codes.shape if codes.dim() == 3 else (None,) * 3
    if values.shape[:3] != codes.shape or values.dim() != 4 or start.shape[::2] != (P, values.shape[-1]):
        raise ValueError(f"block_cache_sums: codes (P, nb, L), values (P, nb, L, D_v) and start (P, S, D_v) "
                         f"expected, got {tuple(codes.shape)}, {tuple(values.shape)} and {tuple(start.shape)}")
    return _block_cache_sums(codes, values, start, first_valid)


def _key_rows(codes: Tensor, n_code: int, n_blocks: int) -> Tensor:
    """For keys with codes (P, n, L) in blocks 0..n-1: the row of their code one block later in a
    (P, n_blocks, S, D_v) tensor flattened to (P n_blocks S, D_v)."""
    P, n, _ = codes.shape
    dev = codes.device
    block = torch.arange(P, device=dev)[:, None, None] * n_blocks + torch.arange(1, n + 1, device=dev)[:, None]
    return block * n_code + codes


@torch.library.custom_op("tvq::block_cache_sums", mutates_args=())
def _block_cache_sums(codes: Tensor, values: Tensor, start: Tensor, first_valid: int) -> Tensor:
    running = values.device.type == "cpu"  # torch.cumsum along a leading dim is slow on a CPU
    return (_sums_running if running else _sums_cumsum)(codes, values, start, first_valid)


def _sums_running(codes: Tensor, values: Tensor, start: Tensor, first_valid: int) -> Tensor:
    """block_cache_sums as a running sum: per block, copy the previous sums and add L keys."""
    P, nb, L = codes.shape
    S, Dv = start.shape[1:]
    rows = _key_rows(codes, S, nb)  # (P, nb, L): key l of block n adds to the sums of block n + 1
    out = values.new_empty(P, nb, S, Dv)
    out[:, 0] = start
    flat = out.view(-1, Dv)  # (P nb S, D_v)
    for n in range(1, nb):
        out[:, n] = out[:, n - 1]
        lo = min(max(first_valid - (n - 1) * L, 0), L)  # first valid key of block n - 1
        if lo < L:
            flat.index_add_(0, rows[:, n - 1, lo:].flatten(), values[:, n - 1, lo:].reshape(-1, Dv))
    return out


def _sums_cumsum(codes: Tensor, values: Tensor, start: Tensor, first_valid: int) -> Tensor:
    """block_cache_sums as one scatter of all keys (each into the block after its own) and a cumsum."""
    P, nb, L = codes.shape
    S, Dv = start.shape[1:]
    dev = codes.device
    out = values.new_zeros(P, nb + 1, S, Dv)  # block nb: the last block's keys, dropped
    keep = torch.arange(nb * L, device=dev).view(nb, L) >= first_valid  # (nb, L)
    dropped = (torch.arange(P, device=dev)[:, None, None] * (nb + 1) + nb) * S + codes  # empty slots go there
    rows = torch.where(keep, _key_rows(codes, S, nb + 1), dropped)  # (P, nb, L)
    out.view(-1, Dv).index_add_(0, rows.flatten(), values.reshape(-1, Dv))
    out[:, 0] += start
    return out.cumsum(1)[:, :nb]


@_block_cache_sums.register_fake
def _(codes, values, start, first_valid):
    return values.new_empty(*codes.shape[:2], *start.shape[1:])


@torch.library.custom_op("tvq::block_cache_sums_backward", mutates_args=())
def _block_cache_sums_backward(grad: Tensor, codes: Tensor, first_valid: int) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`block_cache_sums` for values (P, nb, L, D_v) and start (P, S, D_v)."""
    P, nb, L = codes.shape
    S, Dv = grad.shape[2:]
    grad = grad.contiguous()
    if grad.device.type != "cpu":
        suffix = grad.flip(1).cumsum(1).flip(1)  # (P, nb, S, D_v): sum over blocks >= n
    else:
        suffix = torch.empty_like(grad)
        suffix[:, nb - 1] = grad[:, nb - 1]
        for n in range(nb - 2, -1, -1):
            torch.add(suffix[:, n + 1], grad[:, n], out=suffix[:, n])
    g_values = grad.new_zeros(P, nb, L, Dv)
    if nb > 1:  # key l of block n < nb - 1 feeds blocks n + 1.. at its code
        rows = _key_rows(codes[:, :-1], S, nb)  # (P, nb - 1, L)
        g_values[:, :-1] = suffix.view(-1, Dv).index_select(0, rows.flatten()).view(P, nb - 1, L, Dv)
        g_values.view(P, nb * L, Dv)[:, :first_valid] = 0
    return g_values, suffix[:, 0].clone()


@_block_cache_sums_backward.register_fake
def _(grad, codes, first_valid):
    P, nb, L = codes.shape
    return grad.new_empty(P, nb, L, grad.shape[-1]), grad.new_empty(P, *grad.shape[2:])


def _block_cache_sums_setup(ctx, inputs, output):
    codes, _, _, first_valid = inputs
    ctx.save_for_backward(codes)
    ctx.first_valid = first_valid


def _block_cache_sums_grad(ctx, grad):
    (codes,) = ctx.saved_tensors
    g_values, g_start = _block_cache_sums_backward(grad, codes, ctx.first_valid)
    return None, g_values, g_start, None


_block_cache_sums.register_autograd(_block_cache_sums_grad, setup_context=_block_cache_sums_setup)


def cache_log_count(count: Tensor) -> Tensor:
    """log n_s, and -inf for codes with no cached key."""
    return torch.where(count > 0, count.clamp_min(1.0).log(), float("-inf"))
