"""Linear-time VQ attention: a sliding window per block plus the compressive cache (docs/spec.md section 4).

All blocks are computed at once. Queries are split into blocks of L; block n attends to a
window of the M + L keys ending at its last query, and to the cache of every key before that
window. The cache's share of the output is read from running per-code value sums (summed in float32 or
wider, read by products in the values' dtype: :func:`tvq.ops.cache.cache_read`); everything else is
batched over blocks, and there is no (T, T) tensor: time O(T (M + L + S)) and memory O(T (M + L + S)).
Under autocast every product runs in the compute dtype; scores, the softmax and the cache's sums and
counts stay in float32.

On CUDA with Triton installed (:func:`tvq.ops.kernels.kernels_enabled`) fused kernels replace parts of this
code, which stays their reference: the scores, masks and softmax (:mod:`tvq.ops.kernels.scores`), the
cache read (:mod:`tvq.ops.kernels.cache_scan`) and the window's value product, which reads the windows in place
(:mod:`tvq.ops.kernels.window_values`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from tvq.ops.cache import block_counts, block_grid, cache_log_count, cache_read
from tvq.ops.kernels import kernels_enabled
from tvq.ops.quadratic import scaled_biases


def skew(x: Tensor, width: int, fill: Tensor | None = None) -> Tensor:
    """(..., L, J) -> (..., L, width) with out[..., a, w] = x[..., a, w - a] for 0 <= w - a < J.

    The other entries come from a pad of (L, width + 1 - J) appended to each row of x: out[..., a, w]
    is fill[a, w - a - J] for w - a >= J and fill[a - 1, width + 1 + w - a - J] for w < a (zeros
    without ``fill``; see :func:`relative_fill`). (The Transformer-XL relative shift, done with one pad
    and one reshape.)
    """
    L, J = x.shape[-2:]
    if fill is None:
        x = F.pad(x, (0, width + 1 - J))  # (..., L, width + 1)
    else:
        x = torch.cat([x, fill.to(x.dtype).expand(*x.shape[:-1], -1)], -1)
    return x.flatten(-2)[..., : L * width].unflatten(-1, (L, width))


def relative_fill(L: int, M: int, before: float, device) -> Tensor:
    """The pad of :func:`skew` (L, L) for windows of M + L keys ending at each block of L queries: -inf
    where a key is after its query (w > a + M), ``before`` where it is more than M before it (w < a)."""
    r = torch.arange(L, device=device)[:, None]
    c = torch.arange(L, device=device)[None, :]
    return torch.where(c < L - 1 - r, float("-inf"), before)  # (L, L)


class _Windows(torch.autograd.Function):
    """x (B, H, M + nb L, D) -> its nb windows of W = M + L rows, one every L rows: (B, H, nb, W, D), a view.

    The same as ``x.unfold(2, W, L).transpose(-1, -2)``, with a backward that sums the overlapping
    windows' gradients as ceil(W / L) strided adds of whole blocks, reading the gradient in its own
    layout (``unfold``'s backward reads it transposed: 9.7 ms against 1.5 ms for the value windows of
    8k tokens, bench-small, on the 2-core CPU).
    """

    @staticmethod
    def forward(ctx, x, W, L):
        ctx.shape, ctx.W, ctx.L = x.shape, W, L
        return x.unfold(2, W, L).transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad):
        (B, H, N, D), W, L = ctx.shape, ctx.W, ctx.L
        nb = grad.shape[2]
        g = grad.new_zeros(B, H, N + L, D)  # L spare rows: a last partial piece may start past N - nb L
        for lo in range(0, W, L):  # rows lo..lo+w of every window are rows lo + n L + (0..w) of x
            w = min(L, W - lo)
            # add_ on the view (``view[...] += x`` would write the sum back with a second, full copy)
            g[:, :, lo: lo + nb * L].unflatten(2, (nb, L))[..., :w, :].add_(grad[:, :, :, lo: lo + w])
        return g[:, :, :N], None, None


class _KeepGradMatmul(torch.autograd.Function):
    """a @ b whose gradient to b counts only the kept products (both gradients are exact otherwise).

    ``keep`` broadcasts against a (mask_a=True: drop a[..., i, j] from b's gradient) or against the
    output (mask_a=False: drop out[..., i, j]'s gradient from b). This stops gradients through
    chosen (query, key) pairs without a second matmul. Under autocast the product runs in the
    autocast dtype (that of ``grad``); the gradients are computed in it too and returned in the
    dtypes of a and b, as autocast's own casts would.
    """

    @staticmethod
    def forward(ctx, a, b, keep, mask_a):
        ctx.save_for_backward(a, b, keep)
        ctx.mask_a = mask_a
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b, keep = ctx.saved_tensors
        dt = grad.dtype
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = (grad @ b.to(dt).transpose(-1, -2)).to(a.dtype)
        if ctx.needs_input_grad[1]:
            zero = torch.zeros((), dtype=dt, device=grad.device)
            if ctx.mask_a:
                grad_b = torch.where(keep, a.to(dt), zero).transpose(-1, -2) @ grad
            else:
                grad_b = a.to(dt).transpose(-1, -2) @ torch.where(keep, grad, zero)
            grad_b = grad_b.sum_to_size(b.shape).to(b.dtype)
        return grad_a, grad_b, None, None


def blockwise_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    codes: Tensor,
    *,
    n_invalid: int | Tensor,
    rel: Tensor,
    u: Tensor,
    v: Tensor,
    mem_len: int,
    block_len: int,
    agg_cache: bool,
    grad_thru_cache: bool,
    cache: tuple[Tensor, Tensor, Tensor],
    straight_through: str = "window",
    cache_bias: Tensor | None = None,
    uv_scale: float = 1.0,
    gate: Tensor | None = None,
    fold: bool = False,
    block_count: Tensor | None = None,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Exactly :func:`tvq.ops.quadratic_attention` with quantized keys, in linear time.

    keys (B, H, M + T, D_k), values (B, H, M + T, D_v) and codes (B, H, M + T) start with the
    M = ``mem_len`` window slots of the state (the first ``n_invalid`` of them empty; a (B,) tensor gives
    each row its own count, which may reach into the chunk: left padding. A row's empty slots are then
    hidden from its real queries only, so that a padding query still sees its own key);
    ``cache`` = (codebook (H, S, D_k), count (B, H, S), mean (B, H, S, D_v)) holds everything
    older. Any ``block_len`` gives the same result; a chunk shorter than it uses one block.
    Gradients follow ``straight_through`` (see :func:`tvq.ops.quadratic_attention`); under
    ``"block"`` they depend on ``block_len``. ``cache_bias`` (H,), if given, is added to the score of every
    key beyond the window (the cache entries and the older keys of the window's blocks). u and v (H, D_k), in any
    float dtype (the parameters), are added to the queries as ``(u * uv_scale).to(q.dtype)`` (one Triton kernel
    on the kernel path, from float32). ``gate`` (B, H, T, D_v), if given, is the GAU's output gate before its SiLU:
    the result is then ``out * F.silu(gate)``, on the kernel path applied as the output is written (and its
    gradient taken by the values' backward launch: no kernel of its own either way). ``fold``: returns (out,
    folded), folded the cache after the chunk's first T keys (count (B, H, S), mean (B, H, S, D_v), float32: the
    state's, as :func:`tvq.ops.cache.advance_state` folds them) where the kernel path's scan wrote it as it read the
    cache (with ``agg_cache``, T a whole number of blocks), else None (the caller folds). ``block_count`` (B, H, nb,
    S): each block's cache counts where the caller has them (:func:`tvq.ops.cache.join_window`'s, counted by the
    launch that writes the key list), else counted here (:func:`tvq.ops.cache.block_counts`).
    """
    B, H, T, _ = q.shape
    M = mem_len
    L, nb = block_grid(T, block_len)
    pad = nb * L - T
    W = M + L  # window of one block
    acc = torch.promote_types(q.dtype, torch.float32)
    codebook, count0, mean0 = cache

    vals = values
    if pad:  # F.pad copies even when there is nothing to add
        q, keys = F.pad(q, (0, 0, 0, pad)), F.pad(keys, (0, 0, 0, pad))
        vals, codes = F.pad(values, (0, 0, 0, pad)), F.pad(codes, (0, pad))
    # keys (B, H, M + nb L, D_k), vals (B, H, M + nb L, D_v), codes (B, H, M + nb L)
    fused = kernels_enabled(vals)  # the Triton kernels (tvq.ops.kernels) read the windows in place: none built
    v_win = None if fused else _Windows.apply(vals, W, L)  # (B, H, nb, W, D_v)
    if fused:  # u, v and the positional scores (q + v) @ rel^T: one kernel each way (tvq.ops.kernels.query_bias)
        from tvq.ops.kernels.query_bias import query_biases_kernel

        qu, pos = query_biases_kernel(q, u, v, rel, uv_scale)  # (B, H, nb L, D_k), (B, H, nb L, M + 1)
        pos = pos.unflatten(2, (nb, L))  # (B, H, nb, L, M + 1), pos[a, d]: distance d
    else:
        u, v = scaled_biases(u, v, uv_scale, q.dtype)  # (H, D_k) each
        qu, qv = q + u[:, None], (q + v[:, None]).unflatten(2, (nb, L))  # (B, H, nb L, D_k), (B, H, nb, L, D_k)
    qu = qu.unflatten(2, (nb, L))  # (B, H, nb, L, D_k)

    # window slot w of query a: distance d = M + a - w; near (0 <= d <= M): content + positional score,
    # old (d > M, agg_cache): content only, future (d < 0) or an empty slot (before n_invalid): -inf
    dev = q.device
    # window slots whose key (key_keep) and value (value_keep) get a gradient; None: all of them
    key_keep = value_keep = None
    if torch.is_grad_enabled() and straight_through == "block":
        if not grad_thru_cache:  # the carried window is stop-gradient: only the block's own keys and values
            key_keep = value_keep = (torch.arange(W, device=dev) >= M)[None, :]  # (1, W)
    elif torch.is_grad_enabled() and agg_cache:
        a = torch.arange(L, device=dev)[:, None]
        old = torch.arange(W, device=dev)[None, :] < a  # (L, W)
        # old keys are codewords: same score, but no straight-through gradient to the key
        key_keep = ~old
        value_keep = None if grad_thru_cache else ~old
    per_row = isinstance(n_invalid, Tensor)

    if agg_cache:
        # Cache of block n = the state's cache (count c0, mean m0) + every key before its window
        # (key blocks 0..n-1): count_n = c0 + N_n and value sum c0 m0 + S_n, with N_n, S_n
        # exclusive prefix sums of per-block code statistics. The cache's share of the output,
        # sum_s p_s (c0 m0 + S_n)_s / count_n,s, is then one (L, S) @ (S, D_v) product per block.
        blk_codes = codes[:, :, : nb * L].unflatten(2, (nb, L))  # (B, H, nb, L)
        c0 = count0.to(acc)  # (B, H, S)
        count = block_count.to(acc) if block_count is not None else \
            block_counts(codes[:, :, : nb * L], n_invalid, c0, L)  # (B, H, nb, S)

    if fused:  # scores, masks and softmax in one Triton kernel (tvq.ops.kernels.scores)
        from tvq.ops.kernels.scores import window_softmax

        dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else qu.dtype
        # key_keep by name: the block's own slots (w >= M) or the near ones (w >= a)
        key_rule = None if key_keep is None else "own" if straight_through == "block" else "near"
        # p_cache (B, H, nb, L, S or 0) not divided by the count, in the values' dtype (the cache read divides)
        p_win, p_cache = window_softmax(
            qu, keys, pos, n_invalid=n_invalid, key_keep=key_rule, cache=(codebook, count) if agg_cache else None,
            cache_bias=cache_bias, out_dtype=vals.dtype, dtype=dt)  # p_win (B, H, nb, L, W)
    else:
        k_win = _Windows.apply(keys, W, L)  # (B, H, nb, W, D_k)
        if key_keep is None:
            content = qu @ k_win.transpose(-1, -2)  # (B, H, nb, L, W)
        else:
            content = _KeepGradMatmul.apply(qu, k_win.transpose(-1, -2), key_keep, False)  # (B, H, nb, L, W)
        fill = relative_fill(L, M, 0.0 if agg_cache else float("-inf"), dev)  # (L, L)
        if agg_cache and cache_bias is not None:  # old keys in the window are the cache's too: same offset
            fill = fill.to(q.dtype) + cache_bias.to(q.dtype)[:, None, None, None]  # (H, 1, L, L)
        positional = skew(qv @ rel.flip(1)[:, None].transpose(-1, -2), W, fill)  # (B, H, nb, L, W), masks included
        scores = (content + positional).to(acc)  # (B, H, nb, L, W)
        if per_row:  # slot s (key-list index) is empty for row b's queries at index >= n_invalid[b]
            ninv = n_invalid.view(B, 1, 1, 1)
            slot = torch.arange(nb, device=dev)[:, None] * L + torch.arange(W, device=dev)  # (nb, W)
            query = M + torch.arange(nb * L, device=dev).view(nb, L)  # (nb, L)
            empty = (slot[None, :, None, :] < ninv) & (query[None, :, :, None] >= ninv)  # (B, nb, L, W)
            scores.masked_fill_(empty[:, None], float("-inf"))
        else:
            n_bad = min(-(-n_invalid // L), nb)  # blocks whose windows hold empty slots
            if n_bad:
                # (n_bad, W)
                empty = torch.arange(n_bad, device=dev)[:, None] * L + torch.arange(W, device=dev) < n_invalid
                scores[:, :, :n_bad].masked_fill_(empty[:, None, :], float("-inf"))
        if agg_cache:
            cache_scores = (qu @ codebook.to(q.dtype)[:, None].transpose(-1, -2)).to(acc)  # (B, H, nb, L, S)
            cache_scores = cache_scores + cache_log_count(count)[..., None, :]
            if cache_bias is not None:
                cache_scores = cache_scores + cache_bias.to(acc)[:, None, None, None]

        # one softmax over the window and the cache (a fused kernel, forward and backward)
        p = torch.softmax(torch.cat([scores, cache_scores], -1) if agg_cache else scores, -1)  # (B, H, nb, L, W [+ S])
        # split, not sliced: backward joins the two gradients in one pass (slices would each pad to the full width)
        p_win, p_cache = p.split([W, p.shape[-1] - W], -1)  # (B, H, nb, L, W), (B, H, nb, L, S or 0)
        p_win = p_win.to(vals.dtype)
    if fused:  # products in the compute dtype, as autocast's
        from tvq.ops.kernels.window_values import window_values_kernel

        v_dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else vals.dtype
        # value_keep by name: the block's own slots (w >= M) or the near ones (w >= a)
        value_rule = None if value_keep is None else "own" if straight_through == "block" else "near"
        gate_rows = None if gate is None else gate.reshape(B * H, T, gate.shape[-1])  # (B H, T, D_v), a view for H 1
    if not agg_cache and fused:
        out = window_values_kernel(p_win.flatten(0, 1), vals.flatten(0, 1), keep=value_rule, dtype=v_dt,
                                   gate=gate_rows)
        return _result(out.unflatten(0, (B, H)).flatten(2, 3)[:, :, :T].to(q.dtype), fold)  # (B, H, T, D_v)
    if not agg_cache:
        out = p_win @ v_win if value_keep is None else _KeepGradMatmul.apply(p_win, v_win, value_keep, True)
        return _result(_gated(out.flatten(2, 3)[:, :, :T], gate).to(q.dtype), fold)  # (B, H, T, D_v)

    # the cache read's products run in the values' dtype; its sums in acc
    if fused:  # the cache read (a Triton scan writes the means C_n / count_n, sums in float32 on chip) and the
        # window product as one autograd node: the values' two gradients written by one kernel
        from tvq.ops.kernels.window_values import block_values_kernel

        cache = (p_cache.to(vals.dtype).flatten(0, 1), blk_codes.flatten(0, 1),
                 mean0.flatten(0, 1), count.flatten(0, 1),  # the scan multiplies mean0 by count[:, 0] = c0
                 n_invalid[:, None].expand(B, H).flatten() if per_row else n_invalid)  # per row: (B H,)
        scan_folds = fold and not pad  # the scan folds whole blocks: the chunk's T keys when none is padded
        out = block_values_kernel(p_win.flatten(0, 1), vals.flatten(0, 1), cache, keep=value_rule, dtype=v_dt,
                                  cache_grad=grad_thru_cache, gate=gate_rows, fold=scan_folds)  # (B H, nb, L, D_v)
        out, folded = out if scan_folds else (out, None)
        out = out.unflatten(0, (B, H)).flatten(2, 3)[:, :, :T].to(q.dtype)  # (B, H, T, D_v)
        if folded is not None:  # (B, H, S), (B, H, S, D_v)
            folded = folded[0].unflatten(0, (B, H)), folded[1].unflatten(0, (B, H))
        return (out, folded) if fold else out
    cache_vals = vals[:, :, : nb * L].unflatten(2, (nb, L))  # (B, H, nb, L, D_v)
    if not grad_thru_cache:
        cache_vals = cache_vals.detach()
    p_mean = (p_cache / count.clamp_min(1.0)[..., None, :]).to(vals.dtype)  # (B, H, nb, L, S): p_s / count_s
    if per_row:  # zeros stand for empty slots; skipping those empty in every row only saves work: on a CPU,
        # where reading the count is free
        valid = (torch.arange(nb * L, device=dev) >= n_invalid[:, None]).view(B, 1, nb, L)
        cache_vals = torch.where(valid[..., None], cache_vals, 0.0)
        first_valid = int(n_invalid.min()) if dev.type == "cpu" and not torch.compiler.is_compiling() else 0
    else:
        first_valid = n_invalid
    out = cache_read(
        p_mean.flatten(0, 1), blk_codes.flatten(0, 1), cache_vals.flatten(0, 1),
        (c0[..., None] * mean0.to(acc)).flatten(0, 1), first_valid,
    ).unflatten(0, (B, H))  # (B, H, nb, L, D_v), the cache's share; add the window's
    if value_keep is not None:
        out = out + _KeepGradMatmul.apply(p_win, v_win, value_keep, True)  # the others' values get no gradient
    elif out.dtype == v_win.dtype and not torch.is_grad_enabled():  # accumulate into the fresh product in place
        out.flatten(0, 2).baddbmm_(p_win.flatten(0, 2), v_win.flatten(0, 2))
    elif out.dtype == v_win.dtype:  # not in place: autograd would copy the whole gradient back (CopySlices)
        out = torch.baddbmm(out.flatten(0, 2), p_win.flatten(0, 2), v_win.flatten(0, 2)).view(out.shape)
    else:
        out = out + p_win @ v_win
    return _result(_gated(out.flatten(2, 3)[:, :, :T], gate).to(q.dtype), fold)


def _result(out: Tensor, fold: bool) -> Tensor | tuple[Tensor, None]:
    """out, or (out, None) where a fold was asked for and the caller must do it."""
    return (out, None) if fold else out


def _gated(out: Tensor, gate: Tensor | None) -> Tensor:
    """out (B, H, T, D_v) times SiLU(gate) (the same shape), or out (gate None)."""
    return out if gate is None else out * F.silu(gate)
