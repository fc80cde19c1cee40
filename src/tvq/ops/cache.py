"""The compressive cache: per code, a count and a mean value of the keys it stands for."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tvq.ops.kernels import kernels_enabled
from tvq.state import LayerState


def merge_cache(count: Tensor, mean: Tensor, add_count: Tensor, add_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Fold ``add_count`` keys whose values sum to ``add_sum`` into (count, mean).

    count (..., S), mean (..., S, D_v), add_count (..., S), add_sum (..., S, D_v), broadcastable.
    The mean is updated as mean + (sum - n * mean) / (count + n), which stays accurate in float32
    when count is large; a code with no keys keeps a mean that is never read (its score is -inf).
    """
    new_count = count + add_count
    new_mean = mean + (add_sum - add_count[..., None] * mean) / new_count.clamp_min(1.0)[..., None]
    return new_count, new_mean


def join_window(state: LayerState, keys: Tensor, values: Tensor, codes: Tensor, *, block_len: int | None = None,
                n_invalid: int | Tensor = 0) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The key list of a chunk: the state's M window slots, then the chunk's T keys (B, H, T, D_k), values
    (B, H, T, D_v) and codes (B, H, T) -> (B, H, M + T, D_k), (B, H, M + T, D_v), (B, H, M + T), in the chunk's
    dtypes (a carried state may be wider: an fp32 state under autocast would promote the window's products to fp32),
    and with ``block_len`` each block's cache counts (B, H, nb, S) of a chunk of T queries in blocks of it
    (:func:`block_counts` of the list from the state's cache counts; ``n_invalid`` its empty slots), else None.
    On the Triton path one launch writes all (:mod:`tvq.ops.kernels.window_join`)."""
    L, nb = block_grid(keys.shape[2], block_len) if block_len is not None else (0, 0)
    count0 = state.cache_count if block_len is not None else None
    if kernels_enabled(keys) and kernels_enabled(values):
        from tvq.ops.kernels.window_join import window_join_kernel

        in_launch = count0 is not None and count0.dtype == torch.float32  # (the counting kernel's float32 counts)
        *joined, count = window_join_kernel(state.keys, keys, state.values, values, state.codes, codes,
                                            (count0, n_invalid, nb, L) if in_launch else None)
        if count is not None or count0 is None:
            return (*joined, count)
    else:
        joined = (torch.cat([state.keys.to(keys.dtype), keys], 2),
                  torch.cat([state.values.to(values.dtype), values], 2), torch.cat([state.codes, codes], 2))
    if count0 is None:
        return (*joined, None)
    listed = joined[2][:, :, : nb * L]  # a padded last block may reach past the list: its keys are never counted
    listed = torch.nn.functional.pad(listed, (0, nb * L - listed.shape[2])) if listed.shape[2] < nb * L else listed
    return (*joined, block_counts(listed, n_invalid, count0, L))


def block_grid(T: int, block_len: int) -> tuple[int, int]:
    """(L, nb): a chunk of T queries in nb blocks of L = min(block_len, T) (a chunk shorter than a block is one
    block; the last may be padded)."""
    L = min(block_len, T)
    return L, -(-T // L) if L else 0


def advance_state(state: LayerState, keys: Tensor, values: Tensor, codes: Tensor, n_invalid: int | Tensor,
                  *, n_code: int, agg_cache: bool, grad_thru_cache: bool,
                  folded: tuple[Tensor, Tensor] | None = None) -> LayerState:
    """The state after a chunk of T tokens (docs/spec.md section 4): the window keeps the last M keys; the T
    that leave it fold into the cache (with ``agg_cache``), except empty slots (the first ``n_invalid``, an
    int or one per row (B,)).

    keys (B, H, M + T, D_k), values (B, H, M + T, D_v) and codes (B, H, M + T): the old window, then the chunk.
    ``folded``: that cache (count (B, H, S), mean (B, H, S, D_v)) where the attention already folded it (the kernel
    path's scan: ``blockwise_attention(fold=True)``).
    """
    T = keys.shape[2] - state.keys.shape[2]
    count, mean = state.cache_count, state.cache_mean  # (B, H, S), (B, H, S, D_v)
    if agg_cache and folded is not None:
        count, mean = folded
    elif agg_cache:
        leaving = values[:, :, :T] if grad_thru_cache else values[:, :, :T].detach()  # (B, H, T, D_v)
        if mean.dtype == torch.float32 and count.dtype == torch.float32 and kernels_enabled(leaving):
            from tvq.ops.kernels.code_sums import cache_fold_kernel

            # one kernel: the sums folded in on chip (tvq.ops.kernels.code_sums)
            count, mean = cache_fold_kernel(codes[:, :, :T], leaving, n_invalid, count, mean)
        else:
            slot = torch.arange(T, device=keys.device)
            valid = slot >= (n_invalid[:, None, None] if isinstance(n_invalid, Tensor) else n_invalid)  # (B, 1, T)/(T,)
            n, s = code_statistics(codes[:, :, :T], leaving, valid, n_code, mean.dtype)
            count, mean = merge_cache(count, mean, n, s)
    return LayerState(keys[:, :, T:], values[:, :, T:], codes[:, :, T:], count, mean)


def block_counts(codes: Tensor, n_invalid: int | Tensor, count0: Tensor, block_len: int) -> Tensor:
    """The cache's count per code for each block (docs/spec.md section 4) -> (B, H, nb, S): count0 (B, H, S)
    (the carried cache's) plus the valid keys of blocks 0..n-1 with that code, in count0's dtype.

    codes (B, H, nb L) are the key list's first nb blocks, the first ``n_invalid`` (an int or one per row
    (B,)) empty slots. Counted in integers: exact, and an integer cumsum is deterministic on CUDA (a float one is
    not); on the Triton path (:func:`tvq.ops.kernels.kernels_enabled`; float32 counts) one kernel with the running
    counts on chip (:func:`tvq.ops.kernels.cache_scan.block_counts_kernel`)."""
    B, H, S = count0.shape
    L = block_len
    nb = codes.shape[-1] // L
    if codes.shape[-1] != nb * L or codes.shape[:2] != (B, H):
        raise ValueError(f"block_counts: codes (B, H, nb L) and count0 (B, H, S) expected, got {tuple(codes.shape)} "
                         f"and {tuple(count0.shape)} (L = {L})")
    if count0.dtype == torch.float32 and kernels_enabled(count0):
        from tvq.ops.kernels.cache_scan import block_counts_kernel

        first = n_invalid[:, None].expand(B, H).flatten() if isinstance(n_invalid, Tensor) else n_invalid
        return block_counts_kernel(codes.flatten(0, 1), count0.reshape(B * H, S), first, nb, L).view(B, H, nb, S)
    blk_codes = codes.unflatten(2, (nb, L))  # (B, H, nb, L)
    slot = torch.arange(nb * L, device=codes.device)
    if isinstance(n_invalid, Tensor):
        valid = (slot >= n_invalid[:, None]).view(B, 1, nb, L)
    else:
        valid = (slot >= n_invalid).view(nb, L)
    n_blk = torch.zeros(B, H, nb, S, dtype=torch.long, device=codes.device).scatter_add_(
        3, blk_codes, valid.long().expand(B, H, nb, L))  # (B, H, nb, S)
    return count0[:, :, None] + (n_blk.cumsum(2) - n_blk).to(count0.dtype)


def code_statistics(codes: Tensor, values: Tensor, valid: Tensor | None, n_code: int, dtype: torch.dtype):
    """Per-code counts (..., S) and value sums (..., S, D_v) of keys with codes (..., N): the one place
    tvq sums per code (the cache, the codebook statistics, k-means).

    values (..., N, D_v); valid (bool, broadcastable to codes) is False for empty slots; None: all valid.
    One scatter-add (O(N D_v)) instead of a one-hot matmul (O(N S D_v)); empty slots go to a
    spare bucket that is dropped. On the Triton path (:func:`tvq.ops.kernels.kernels_enabled`; float32 sums) one
    kernel reads the values in their own dtype instead (:mod:`tvq.ops.kernels.code_sums`).
    """
    if dtype == torch.float32 and kernels_enabled(values):
        from tvq.ops.kernels.code_sums import code_sums_kernel

        return code_sums_kernel(codes, values, valid, n_code)
    lead, S = codes.shape[:-1], n_code
    groups = math.prod(lead)
    offset = torch.arange(groups, device=codes.device).view(*lead, 1) * S
    idx = codes + offset if valid is None else torch.where(valid, codes + offset, groups * S)
    idx = idx.flatten()  # (G N,), spare bucket G S
    counts = torch.zeros(groups * S + 1, dtype=dtype, device=codes.device)
    counts.index_add_(0, idx, torch.ones(idx.shape, dtype=dtype, device=codes.device))
    sums = sum_rows(idx, values.to(dtype).flatten(0, -2), groups * S + 1)
    return counts[:-1].view(*lead, S), sums[:-1].view(*lead, S, values.shape[-1])


@torch.library.custom_op("tvq::sum_rows", mutates_args=())
def sum_rows(index: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """(n_out, D): out[i] = the sum of rows[j] (N, D) over index[j] == i.

    An op of its own so that a compiled graph calls aten's index_add instead of generating a scatter
    of atomic adds (on a CPU ~10x slower: 6 ms against 0.5 ms for 8k values of width 512).
    """
    return rows.new_zeros(n_out, rows.shape[-1]).index_add_(0, index, rows)


@sum_rows.register_fake
def _(index, rows, n_out):
    return rows.new_empty(n_out, rows.shape[-1])


def _sum_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _sum_rows_grad(ctx, grad):
    (index,) = ctx.saved_tensors
    return None, grad[index], None


sum_rows.register_autograd(_sum_rows_grad, setup_context=_sum_rows_setup)


def cache_read(weights: Tensor, codes: Tensor, values: Tensor, start: Tensor, first_valid: int = 0) -> Tensor:
    """The cache's share of each block's output (docs/spec.md section 4): out[:, n] = weights[:, n] @ C_n (P, nb, L, D_v).

    C_n (P, S, D_v) is the cache of block n: C_n[s] = start[s] + the sum of the values of the keys of
    blocks 0..n-1 with code s. weights (P, nb, L, S), codes (P, nb, L), values (P, nb, L, D_v) and
    start (P, S, D_v); keys before position ``first_valid`` (empty slots) are skipped.

    Dtypes: the sums C_n accumulate in ``start``'s dtype (float32 or wider: whole-sequence sums stay
    exact enough), the products read them in ``weights``' dtype (the compute dtype: bf16 under autocast,
    so no GEMM runs in float32), and the output has ``weights``' dtype. ``values`` may be in either.

    The nb caches are never all held at once (they would be (P, nb, S, D_v), S / L times the size of the
    values): on a CPU, and in deterministic mode (``torch.use_deterministic_algorithms``: a float cumsum
    has no deterministic CUDA kernel), one running sum, updated by a scatter of L keys per block, feeds
    one product per block; elsewhere chunks of blocks (at most 256 MiB of caches) come from one scatter
    and a cumsum. Backward recomputes them the same way.
    """
    if codes.dim() != 3 or weights.shape[:3] != codes.shape or values.dim() != 4 or values.shape[:3] != codes.shape \
            or start.shape != (codes.shape[0], weights.shape[-1], values.shape[-1]):
        raise ValueError(f"cache_read: weights (P, nb, L, S), codes (P, nb, L), values (P, nb, L, D_v) and "
                         f"start (P, S, D_v) expected, got {tuple(weights.shape)}, {tuple(codes.shape)}, "
                         f"{tuple(values.shape)} and {tuple(start.shape)}")
    if torch.promote_types(start.dtype, weights.dtype) != start.dtype:
        raise ValueError(f"cache_read: start ({start.dtype}) must be at least as wide as weights ({weights.dtype})")
    return _cache_read(weights, codes, values, start, first_valid)


_CHUNK_BYTES = 256 * 2**20  # off a CPU: the caches of one chunk of blocks, (P, c, S, D_v), stay under this


def _valid_from(first_valid: int, n: int, L: int) -> int:
    """The first valid key of block n."""
    return min(max(first_valid - n * L, 0), L)


def _blocks_per_chunk(start: Tensor) -> int:
    return max(1, _CHUNK_BYTES // (start.numel() * start.element_size()))


def _chunks(nb: int, size: int) -> list[tuple[int, int]]:
    return [(c0, min(c0 + size, nb)) for c0 in range(0, nb, size)]


def _chunk_caches(codes: Tensor, values: Tensor, start: Tensor, first_valid: int) -> Tensor:
    """For a chunk of c blocks: (P, c + 1, S, D_v), the caches of its blocks 0..c (block c: of the
    next chunk), i.e. start + a cumsum of per-block sums, each key scattered into the block after its own."""
    P, c, L = codes.shape
    S, Dv = start.shape[1:]
    dev = codes.device
    sums = start.new_zeros(P, c + 2, S, Dv)  # block c + 1: the empty slots, dropped
    keep = torch.arange(c * L, device=dev).view(c, L) >= first_valid  # (c, L)
    block = torch.where(keep, torch.arange(1, c + 1, device=dev)[:, None], c + 1)  # (c, L)
    rows = (torch.arange(P, device=dev)[:, None, None] * (c + 2) + block) * S + codes  # (P, c, L)
    sums.view(-1, Dv).index_add_(0, rows.flatten(), values.reshape(-1, Dv).to(sums.dtype))
    sums[:, 0] = start
    return sums[:, : c + 1].cumsum(1)


def _key_rows(codes: Tensor, n_code: int) -> Tensor:
    """Rows of keys with codes (P, nb, L) in a (P, S, D_v) cache flattened to (P S, D_v)."""
    return codes + torch.arange(codes.shape[0], device=codes.device)[:, None, None] * n_code


def _running_caches(codes, values, start, first_valid):
    """Yield (n, C_n) for n = 0..nb-1: one (P, S, D_v) running sum in ``start``'s dtype, a scatter of L keys
    per block (C_n is overwritten by the next step)."""
    _, nb, L = codes.shape
    Dv = values.shape[-1]
    run = start.clone()
    flat = run.view(-1, Dv)  # (P S, D_v)
    rows = _key_rows(codes, start.shape[1]).transpose(0, 1)  # (nb, P, L)
    vals = values.transpose(0, 1)  # (nb, P, L, D_v)
    for n in range(nb):
        yield n, run
        lo = _valid_from(first_valid, n, L)
        if n + 1 < nb and lo < L:
            flat.index_add_(0, rows[n, :, lo:].flatten(), vals[n, :, lo:].reshape(-1, Dv).to(flat.dtype))


def _chunked_caches(codes, values, start, first_valid, size):
    """Yield (c0, c1, caches (P, c1 - c0, S, D_v)) for chunks of ``size`` blocks, each from one
    scatter and a cumsum."""
    L = codes.shape[2]
    run = start
    for c0, c1 in _chunks(codes.shape[1], size):
        caches = _chunk_caches(codes[:, c0:c1], values[:, c0:c1], run, first_valid - c0 * L)  # (P, c + 1, S, D_v)
        yield c0, c1, caches[:, :-1]
        run = caches[:, -1]


def _n_empty(start: Tensor, first_valid: int, L: int, nb: int) -> int:
    """How many leading blocks read an all-zero cache: with ``start`` zero (a fresh state), blocks
    0..first_valid // L, whose caches hold only empty slots. Their products are skipped: at the start of
    a sequence that is the first two blocks (M = L), half the cache read of a 512-token forward.
    (``aminmax`` tests for zeros in one vectorised pass, ~4x faster than ``any`` on a CPU; a NaN
    counts as non-zero.) Off a CPU (the deterministic path) nothing is skipped: reading ``start`` would wait
    for the device."""
    if start.device.type != "cpu":
        return 0
    if start.numel():
        lo, hi = torch.aminmax(start)
        if lo.item() != 0 or hi.item() != 0:
            return 0
    return min(nb, first_valid // L + 1)


def _read_running(weights, codes, values, start, first_valid):
    """cache_read on a CPU (or deterministic): per block one product with the running cache."""
    out = weights.new_empty(values.shape)
    n_empty = _n_empty(start, first_valid, codes.shape[2], codes.shape[1])
    out[:, :n_empty] = 0
    w_blocks, out_blocks = weights.unbind(1), out.unbind(1)  # views made at once: the loop only multiplies
    for n, cache in _running_caches(codes, values, start, first_valid):
        if n >= n_empty:
            torch.bmm(w_blocks[n], cache.to(weights.dtype), out=out_blocks[n])
    return out


def _read_chunked(weights, codes, values, start, first_valid, size):
    """cache_read in chunks of ``size`` blocks: one product per chunk."""
    out = weights.new_empty(values.shape)
    for c0, c1, caches in _chunked_caches(codes, values, start, first_valid, size):
        torch.matmul(weights[:, c0:c1], caches.to(weights.dtype), out=out[:, c0:c1])
    return out


def _running(values: Tensor) -> bool:
    """Whether to read block by block: on a CPU (a cumsum along a leading dim is slow there) and in
    deterministic mode (CUDA has no deterministic float cumsum; its scatter-adds are deterministic then)."""
    return values.device.type == "cpu" or torch.are_deterministic_algorithms_enabled()


@torch.library.custom_op("tvq::cache_read", mutates_args=())
def _cache_read(weights: Tensor, codes: Tensor, values: Tensor, start: Tensor, first_valid: int) -> Tensor:
    if _running(values):
        return _read_running(weights, codes, values, start, first_valid)
    return _read_chunked(weights, codes, values, start, first_valid, _blocks_per_chunk(start))


@_cache_read.register_fake
def _(weights, codes, values, start, first_valid):
    return weights.new_empty(values.shape)


# Backward. With G_n = sum over n' >= n of weights[:, n']^T grad[:, n'] (P, S, D_v), the gradient that
# reaches the cache of block n and every later one: key l of block n receives G_{n+1} at its code, and
# start receives G_0. The weights' gradient needs the caches again, recomputed in block order.

def _grad_running(grad, weights, codes, values, start, first_valid, keys_too):
    P, nb, L = codes.shape
    S, Dv = start.shape[1:]
    g_weights = torch.empty_like(weights)
    n_empty = _n_empty(start, first_valid, L, nb)
    g_weights[:, :n_empty] = 0
    for n, cache in _running_caches(codes, values, start, first_valid):
        if n >= n_empty:
            torch.bmm(grad[:, n], cache.to(grad.dtype).transpose(1, 2), out=g_weights[:, n])
    if not keys_too:
        return g_weights, values.new_empty(0), start.new_empty(0)
    rows = _key_rows(codes, S)  # (P, nb, L)
    g_values = values.new_zeros(P, nb, L, Dv)
    g_cache = start.new_zeros(P, S, Dv)  # G_{n + 1}, in start's dtype
    for n in range(nb - 1, -1, -1):
        lo = _valid_from(first_valid, n, L)
        if n + 1 < nb and lo < L:
            g_values[:, n, lo:] = g_cache.view(-1, Dv)[rows[:, n, lo:]]
        if weights.dtype == g_cache.dtype:
            g_cache.baddbmm_(weights[:, n].transpose(1, 2), grad[:, n])
        else:  # the product in the compute dtype, the running sum wider
            g_cache += torch.bmm(weights[:, n].transpose(1, 2), grad[:, n])
    return g_weights, g_values, g_cache


def _grad_chunked(grad, weights, codes, values, start, first_valid, keys_too, size):
    P, nb, L = codes.shape
    S, Dv = start.shape[1:]
    dev = codes.device
    g_weights = torch.empty_like(weights)
    for c0, c1, caches in _chunked_caches(codes, values, start, first_valid, size):
        torch.matmul(grad[:, c0:c1], caches.to(grad.dtype).transpose(-1, -2), out=g_weights[:, c0:c1])
    if not keys_too:
        return g_weights, values.new_empty(0), start.new_empty(0)
    g_values = values.new_empty(P, nb, L, Dv)
    g_cache = start.new_zeros(P, S, Dv)  # G_{c1}
    heads = torch.arange(P, device=dev)[:, None, None]
    for c0, c1 in reversed(_chunks(nb, size)):
        c = c1 - c0
        per_block = weights[:, c0:c1].transpose(-1, -2) @ grad[:, c0:c1]  # (P, c, S, D_v)
        # G_{c0 + j} = G_{c0} - (sum of per_block[:j]), G_{c0} = G_{c1} + all of them: one forward cumsum, and only
        # the rows the keys read are gathered (no reversed copies)
        run = per_block.to(g_cache.dtype).cumsum(1)  # (P, c, S, D_v) inclusive: G_{c0 + j + 1} = G_{c0} - run[:, j]
        g_cache = g_cache + run[:, -1]  # G_{c0}
        blocks = torch.arange(c, device=dev)[:, None]  # key of block j reads G_{c0 + j + 1}
        code = codes[:, c0:c1]  # (P, c, L)
        g_chunk = torch.sub(g_cache[heads, code], run[heads, blocks, code], out=g_values[:, c0:c1])  # (P, c, L, D_v)
        if first_valid > c0 * L:  # empty slots in this chunk get no gradient
            g_chunk.mul_(torch.arange(c0 * L, c1 * L, device=dev).view(c, L, 1) >= first_valid)
    return g_weights, g_values, g_cache


@torch.library.custom_op("tvq::cache_read_backward", mutates_args=())
def _cache_read_backward(grad: Tensor, weights: Tensor, codes: Tensor, values: Tensor, start: Tensor,
                         first_valid: int, keys_too: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`cache_read` for weights, values and start (the last two empty unless ``keys_too``)."""
    args = (grad, weights, codes, values, start, first_valid, keys_too)
    if _running(values):
        return _grad_running(*args)
    return _grad_chunked(*args, _blocks_per_chunk(start))


@_cache_read_backward.register_fake
def _(grad, weights, codes, values, start, first_valid, keys_too):
    if not keys_too:
        return torch.empty_like(weights), values.new_empty(0), start.new_empty(0)
    return torch.empty_like(weights), torch.empty_like(values), torch.empty_like(start)


def _cache_read_setup(ctx, inputs, output):
    weights, codes, values, start, first_valid = inputs
    ctx.save_for_backward(weights, codes, values, start)
    ctx.first_valid = first_valid


def _cache_read_grad(ctx, grad):
    weights, codes, values, start = ctx.saved_tensors
    keys_too = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    g_weights, g_values, g_start = _cache_read_backward(grad.contiguous(), weights, codes, values, start,
                                                        ctx.first_valid, keys_too)
    if not keys_too:
        g_values = g_start = None
    return g_weights, None, g_values, g_start, None


_cache_read.register_autograd(_cache_read_grad, setup_context=_cache_read_setup)


def cache_log_count(count: Tensor) -> Tensor:
    """log n_s, and -inf for codes with no cached key."""
    return torch.where(count > 0, count.clamp_min(1.0).log(), float("-inf"))
