"""The Triton cache scan (tvq.ops.kernels.cache_scan) against the PyTorch cache read (tvq.ops.cache.cache_read):
outputs and gradients in float32 (against float64, Triton has no float64) and float16, the scan's custom ops on
fake tensors, and blockwise_attention with the kernels on against off. Without a GPU the kernels run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from tvq.ops import blockwise  # noqa: E402
from tvq.ops.cache import cache_read  # noqa: E402
from tvq.ops.kernels import cache_scan as scan  # noqa: E402
from tvq.ops.kernels import use_kernels  # noqa: E402

F64 = torch.float64
# P rows, nb blocks of L keys, S codes, D_v: S and D_v not powers of two; the second shape has several S and D_v
# tiles (64 wide) and L not a multiple of 16
SHAPES = [(3, 4, 8, 16, 24), (2, 3, 20, 70, 72)]


def rel_err(got, want):
    """Largest absolute difference relative to the largest magnitude of the reference."""
    return ((got.to(F64) - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def make_read(P, nb, L, S, Dv, first_valid, seed=0):
    """Random float64 inputs of a cache read: weights (not divided by the count), codes, values, the carried
    means, the counts (carried ones plus the valid keys of earlier blocks) and the per-row first valid key (P,)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(P, nb, L, S, generator=g, dtype=F64)
    codes = torch.randint(0, S, (P, nb, L), generator=g)
    values = torch.randn(P, nb, L, Dv, generator=g, dtype=F64)
    mean0 = torch.randn(P, S, Dv, generator=g, dtype=F64)
    first = torch.as_tensor(first_valid).expand(P)  # (P,)
    keep = (torch.arange(nb * L) >= first[:, None]).view(P, nb, L)
    n_blk = torch.zeros(P, nb, S, dtype=F64).scatter_add_(2, codes, keep.to(F64))
    count0 = torch.randint(0, 3, (P, S), generator=g).to(F64)
    count = count0[:, None] + n_blk.cumsum(1) - n_blk  # (P, nb, S)
    return weights, codes, values, mean0, count, first


def reference(weights, codes, values, mean0, count, first):
    """cache_read (float64) row by row, each with its own first valid key; the carried sums are the carried
    counts (count[:, 0]) times the means."""
    w = weights / count.clamp_min(1.0)[..., None, :]
    start = count[:, 0, :, None] * mean0  # (P, S, D_v)
    return torch.cat([cache_read(w[p:p + 1], codes[p:p + 1], values[p:p + 1], start[p:p + 1], int(first[p]))
                      for p in range(len(first))])


def check_read(shape, first_valid, dtype, tol, seed=0):
    weights, codes, values, mean0, count, first = make_read(*shape, first_valid, seed)
    ref_in = [t.clone().requires_grad_() for t in (weights, values, mean0)]
    want = reference(ref_in[0], codes, ref_in[1], ref_in[2], count, first)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * grad).sum(), ref_in)
    # the kernel reads a key list: the blocks' values, then 5 more rows that reach no cache (a window's slots)
    P, nb, L, Dv = values.shape
    key_list = torch.cat([values.flatten(1, 2), torch.randn(P, 5, Dv, dtype=F64)], 1)  # (P, nb L + 5, D_v)
    kin = [weights.to(dtype).requires_grad_(), key_list.to(dtype).requires_grad_(),
           mean0.float().requires_grad_()]
    fv = first if isinstance(first_valid, list) else first_valid
    got = scan.cache_read_kernel(kin[0], codes, kin[1], kin[2], count.float(), fv)
    assert got.dtype == dtype and got.shape == want.shape
    got_grads = list(torch.autograd.grad(got, kin, grad.to(dtype)))
    assert (got_grads[1][:, nb * L:] == 0).all()
    got_grads[1] = got_grads[1][:, : nb * L].unflatten(1, (nb, L))
    assert rel_err(got, want) < tol
    for name, x, a, b in zip(("weights", "values", "mean0"), kin, got_grads, want_grads):
        assert a.dtype == x.dtype, name
        assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("first_valid", [0, 3, 11, [0, 21, 5]], ids=["none", "in-block0", "two-blocks", "per-row"])
def test_float32_matches_float64_reference(shape, first_valid):
    if isinstance(first_valid, list):
        first_valid = first_valid[: shape[0]]
    check_read(shape, first_valid, torch.float32, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    check_read(SHAPES[0], 3, dtype, 1e-2 if dtype == torch.float16 else 2e-2)


def test_empty_slots_get_zero_gradient_and_last_block_none():
    weights, codes, values, mean0, count, first = make_read(2, 3, 8, 16, 16, 11)
    values.requires_grad_()
    out = scan.cache_read_kernel(weights.float(), codes, values.float().flatten(1, 2), mean0.float(), count.float(),
                                 11)
    (flat,) = torch.autograd.grad(out.sum(), values)  # (P, nb L, D_v)
    flat = flat.flatten(1, 2)
    assert (flat[:, :11] == 0).all() and (flat[:, -8:] == 0).all()  # empty slots; the last block reaches no cache
    assert (flat[:, 11:-8].abs().sum(-1) > 0).all()


def test_gradients_only_where_asked():
    """Detached values and mean0 (grad_thru_cache off): only the weights get a gradient."""
    weights, codes, values, mean0, count, first = make_read(*SHAPES[0], 0)
    w = weights.float().requires_grad_()
    out = scan.cache_read_kernel(w, codes, values.float().flatten(1, 2), mean0.float(), count.float(), 0)
    (g,) = torch.autograd.grad(out.sum(), w)
    want = torch.autograd.grad(reference(weights.requires_grad_(), codes, values, mean0, count, first).sum(),
                               weights)[0]
    assert rel_err(g, want) < 1e-5


def test_row_groups(monkeypatch):
    """Means bounded per group of rows (_CHUNK_BYTES): the same outputs and gradients as one group."""
    weights, codes, values, mean0, count, first = make_read(*SHAPES[0], 3)
    kin = [t.float().requires_grad_() for t in (weights, values.flatten(1, 2), mean0)]

    def run():
        out = scan.cache_read_kernel(kin[0], codes, kin[1], kin[2], count.float(), 3)
        return (out, *torch.autograd.grad((out * out).sum(), kin))

    whole = run()
    monkeypatch.setattr(scan, "_CHUNK_BYTES", 1)  # one row per group
    assert len(scan._row_groups(3, 4, 16, 24, torch.float32)) == 3
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_ops_on_fake_tensors():
    """The scans trace without running (torch.compile, the cost model): register_fake's shapes and dtypes."""
    with FakeTensorMode():
        P, nb, L, S, Dv = 2, 3, 8, 16, 24
        codes = torch.zeros(P, nb, L, dtype=torch.long)
        values = torch.empty(P, nb, L, Dv, dtype=torch.bfloat16)
        mean0, count = torch.empty(P, S, Dv), torch.empty(P, nb, S)
        first = torch.zeros(P, dtype=torch.int32)
        means = scan.cache_scan(codes, values, mean0, count, first, 0, torch.bfloat16)
        g_values, g_mean0 = scan.cache_scan_backward(codes, means, count, None, 3, torch.bfloat16, torch.float32,
                                                     nb * L + 4)
    assert means.shape == (P, nb, S, Dv) and means.dtype == torch.bfloat16
    assert g_values.shape == (P, nb * L + 4, Dv) and g_values.dtype == torch.bfloat16
    assert g_mean0.shape == mean0.shape and g_mean0.dtype == torch.float32


def test_opcheck():
    weights, codes, values, mean0, count, first = make_read(*SHAPES[0], 3)
    first = first.to(torch.int32)
    args = (codes, values.float(), mean0.float(), count.float(), first, 0, torch.float32)
    torch.library.opcheck(scan.cache_scan.op, args, test_utils=("test_schema", "test_faketensor"))
    g_means = torch.randn(*SHAPES[0][:2], 16, 24)
    n_rows = codes.shape[1] * codes.shape[2] + 4
    torch.library.opcheck(scan.cache_scan.op, (*args[:4], None, 3, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    for fv, first_int in ((first, 0), (None, 3)):
        torch.library.opcheck(scan.cache_scan_backward.op,
                              (codes, g_means, count.float(), fv, first_int, torch.float32, torch.float32, n_rows),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("n_invalid", [0, 11, "per row"])
@pytest.mark.parametrize("nb, L, S", [(3, 8, 20), (2, 70, 130)])
def test_block_counts_kernel_equals_reference(nb, L, S, n_invalid):
    """Each block's cache counts: the kernel (float32, running counts on chip) equals the integer scatter and
    cumsum, for key lists longer than the blocks (strided rows), several code and key tiles, and empty slots."""
    from tvq.ops.cache import block_counts

    g = torch.Generator().manual_seed(nb * L + S)
    B, H = 2, 3
    codes = torch.randint(0, S, (B, H, nb * L + 5), generator=g)[:, :, : nb * L]  # strided rows, as blockwise's
    count0 = torch.randint(0, 9, (B, H, S), generator=g).float()
    first = torch.tensor([3, 2 * L + 1]) if n_invalid == "per row" else n_invalid
    ref = block_counts(codes, first, count0.double(), L)  # the PyTorch path (float64: no kernel)
    with use_kernels(True):
        got = block_counts(codes, first, count0, L)
    assert got.dtype == torch.float32 and got.shape == (B, H, nb, S)
    assert torch.equal(got.double(), ref)
    torch.library.opcheck(scan.block_counts.op, (codes.flatten(0, 1), count0.flatten(0, 1), None, 2, nb, L),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="block_counts"):
        block_counts(codes[..., :-1], first, count0, L)


# blockwise_attention end to end: kernels on (float32) against off (float64)

def attention_inputs(n_invalid, seed=0):
    """B 2, H 2, T 21 queries in blocks of L 8 (the last partial), M 8 window slots, S 20 codes, a carried cache
    with nonzero counts and means; keys are codewords."""
    g = torch.Generator().manual_seed(seed)
    B, H, T, Dk, Dv, M, S = 2, 2, 21, 4, 24, 8, 20
    codebook = torch.randn(H, S, Dk, generator=g, dtype=F64)
    codes = torch.randint(0, S, (B, H, M + T), generator=g)
    keys = codebook[torch.arange(H)[:, None], codes]  # (B, H, M + T, D_k)
    tensors = dict(q=torch.randn(B, H, T, Dk, generator=g, dtype=F64), keys=keys,
                   values=torch.randn(B, H, M + T, Dv, generator=g, dtype=F64),
                   rel=torch.randn(H, M + 1, Dk, generator=g, dtype=F64),
                   u=torch.randn(H, Dk, generator=g, dtype=F64), v=torch.randn(H, Dk, generator=g, dtype=F64),
                   mean0=torch.randn(B, H, S, Dv, generator=g, dtype=F64))
    count0 = torch.randint(0, 4, (B, H, S), generator=g).to(F64)
    return tensors, dict(codes=codes, codebook=codebook, count0=count0, M=M, n_invalid=n_invalid)


def run_attention(tensors, fixed, dtype, straight_through, grad_thru_cache, grad):
    t = {k: x.to(dtype).requires_grad_() for k, x in tensors.items()}
    out = blockwise.blockwise_attention(
        t["q"], t["keys"], t["values"], fixed["codes"], n_invalid=fixed["n_invalid"], rel=t["rel"], u=t["u"],
        v=t["v"], mem_len=fixed["M"], block_len=8, agg_cache=True, grad_thru_cache=grad_thru_cache,
        cache=(fixed["codebook"].to(dtype), fixed["count0"].to(dtype), t["mean0"]), straight_through=straight_through)
    grads = torch.autograd.grad(out, list(t.values()), grad.to(dtype), allow_unused=True)
    return out, dict(zip(t, grads))


@pytest.mark.parametrize("straight_through", ["window", "block"])
@pytest.mark.parametrize("grad_thru_cache", [True, False])
@pytest.mark.parametrize("n_invalid", [0, 11, "per-row"])
def test_blockwise_attention_kernels_on_equals_off(straight_through, grad_thru_cache, n_invalid, monkeypatch):
    n_invalid = torch.tensor([3, 13]) if n_invalid == "per-row" else n_invalid
    tensors, fixed = attention_inputs(n_invalid)
    grad = torch.randn(2, 2, 21, 24, dtype=F64)
    with use_kernels(False):
        want, want_grads = run_attention(tensors, fixed, F64, straight_through, grad_thru_cache, grad)

    def not_here(*args, **kwargs):
        raise AssertionError("the PyTorch cache read ran with the kernels on")

    monkeypatch.setattr(blockwise, "cache_read", not_here)
    with use_kernels(True):
        got, got_grads = run_attention(tensors, fixed, torch.float32, straight_through, grad_thru_cache, grad)
    assert rel_err(got, want) < 1e-5
    for name, g in want_grads.items():
        if g is None:
            assert got_grads[name] is None, name
        else:
            assert rel_err(got_grads[name], g) < 1e-5, name
    assert want_grads["mean0"] is not None


def test_compiles_in_one_graph():
    """torch.compile traces the whole read (the scans through their fake registrations) in one graph."""
    weights, codes, values, mean0, count, first = make_read(*SHAPES[0], 3)
    kin = [t.float().requires_grad_() for t in (weights, values.flatten(1, 2), mean0)]
    compiled = torch.compile(scan.cache_read_kernel, backend="aot_eager", fullgraph=True)
    got = compiled(kin[0], codes, kin[1], kin[2], count.float(), 3)
    got_grads = torch.autograd.grad(got.sum(), kin)
    want = scan.cache_read_kernel(kin[0], codes, kin[1], kin[2], count.float(), 3)
    for a, b in zip((got, *got_grads), (want, *torch.autograd.grad(want.sum(), kin))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flops_and_launches_for_the_cost_model():
    from tvq.ops.kernels import KERNEL_FLOPS, KERNEL_LAUNCHES

    P, nb, L, S, Dv = 2, 3, 8, 16, 24
    codes, g_means = torch.zeros(P, nb, L, dtype=torch.long), torch.empty(P, nb, S, Dv, dtype=torch.bfloat16)
    values, mean0 = torch.empty(P, nb, L, Dv, dtype=torch.bfloat16), torch.empty(P, S, Dv)
    fwd = KERNEL_FLOPS["tvq_kernels::cache_scan"](codes, values, mean0, None, None, 0, torch.bfloat16)
    bwd = KERNEL_FLOPS["tvq_kernels::cache_scan_backward"](codes, g_means, None, None, 0, torch.bfloat16, None, nb * L)
    assert fwd == ("bfloat16", 2 * P * (nb - 1) * L * S * Dv) and bwd == ("bfloat16", 0)
    launches = KERNEL_LAUNCHES["tvq_kernels::cache_scan_backward"]
    assert launches(codes, g_means, None, None, 0, torch.bfloat16, None, nb * L) == (2, P * nb * (S + L) * Dv * 2)
    assert launches(codes, g_means, None, None, 0, torch.float32, None, nb * L + 4)[0] == 2  # the gather zeroes the tail
    assert "tvq_kernels::cache_scan" not in KERNEL_LAUNCHES  # one launch, no scratch


@pytest.mark.parametrize("S", [8, 16])
def test_saved_or_recomputed_means_give_the_same_gradients(monkeypatch, S):
    """S <= L: the forward's means are saved for backward; S > L: backward recomputes them (counted scans)."""
    P, nb, L, Dv = 2, 3, 8, 24
    weights, codes, values, mean0, count, first = make_read(P, nb, L, S, Dv, 3)
    calls = []
    real = scan.cache_scan
    monkeypatch.setattr(scan, "cache_scan", lambda *a: calls.append(1) or real(*a))
    kin = [t.float().requires_grad_() for t in (weights, values.flatten(1, 2), mean0)]
    out = scan.cache_read_kernel(kin[0], codes, kin[1], kin[2], count.float(), 3)
    got = torch.autograd.grad((out * out).sum(), kin)
    assert len(calls) == (1 if S <= L else 2)
    ref_in = [t.clone().requires_grad_() for t in (weights, values, mean0)]
    want = reference(ref_in[0], codes, ref_in[1], ref_in[2], count, first)
    want_g = torch.autograd.grad((want * want).sum(), ref_in)
    assert rel_err(got[0], want_g[0]) < 1e-5 and rel_err(got[1][:, : nb * L].unflatten(1, (nb, L)), want_g[1]) < 1e-5


@pytest.mark.parametrize("first_valid", [0, 11, "per-row"])
def test_the_window_kernel_gathers_the_reverse_scan_as_the_gather_kernel_does(first_valid):
    """cache_scan_backward(gather=False) returns G_{n+1}; the window's value-gradient kernel gathering it at each
    key's block and code equals the same kernel adding the gather kernel's output (every key, empty slots and the
    rows after the blocks zero), for an int or a per-row first valid key."""
    from tvq.ops.kernels import window_values as kwv

    P, nb, L, S, Dv, M = 3, 4, 8, 16, 24, 8
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, S, (P, nb, L), generator=g)
    count = torch.randint(0, 4, (P, nb, S), generator=g).float()
    g_means = torch.randn(P, nb, S, Dv, generator=g)
    p_win = torch.rand(P, nb, L, M + L, generator=g)
    grad = torch.randn(P, nb, L, Dv, generator=g)
    fv, first = (torch.tensor([0, 13, 30], dtype=torch.int32), 0) if first_valid == "per-row" else (None, first_valid)
    N = M + nb * L
    g_values, g_mean0 = scan.cache_scan_backward(codes, g_means, count, fv, first, torch.float32, torch.float32, N)
    g_next, g_mean0b = scan.cache_scan_backward(codes, g_means, count, fv, first, torch.float32, torch.float32, N,
                                                False)
    assert g_next.shape == (P, nb, S, Dv) and torch.equal(g_mean0, g_mean0b)
    for keep in (0, 1, 2):
        want = kwv.window_values_grad_values(p_win, grad, keep, torch.float32, g_values)
        got = kwv.window_values_grad_values(p_win, grad, keep, torch.float32, None, g_next, codes, fv, first)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(scan.cache_scan_backward.op,
                          (codes, g_means, count, fv, first, torch.float32, torch.float32, N, False), test_utils=utils)
    torch.library.opcheck(kwv.window_values_grad_values.op,
                          (p_win, grad, 1, torch.float32, None, g_next, codes, fv, first), test_utils=utils)


# ---- the state's cache folded by the scan (cache_scan_fold) -----------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("first_valid", [0, 11, [0, 21, 5]], ids=["none", "two-blocks", "per-row"])
def test_fold_equals_code_statistics_then_merge(shape, first_valid):
    """cache_scan_fold's state (count', mean') is the carried cache with every block's valid keys folded in, as
    code_statistics + merge_cache compute it in float64 (codes with no key keep mean0: merge_cache's); its means are
    cache_scan's, bit for bit."""
    from tvq.ops.cache import code_statistics, merge_cache

    if isinstance(first_valid, list):
        first_valid = first_valid[: shape[0]]
    _, codes, values, mean0, count, first = make_read(*shape, first_valid, seed=5)
    _, nb, L, S = *codes.shape, mean0.shape[1]
    valid = (torch.arange(nb * L) >= first[:, None])  # (P, nb L)
    n, sums = code_statistics(codes.flatten(1), values.flatten(1, 2), valid, S, F64)
    want_count, want_mean = merge_cache(count[:, 0], mean0, n, sums)
    fv, first_int = (first.to(torch.int32), 0) if isinstance(first_valid, list) else (None, first_valid)
    args = (codes, values.float(), mean0.float(), count.float(), fv, first_int, torch.float32)
    means, new_count, new_mean = scan.cache_scan_fold(*args)
    assert new_count.dtype == new_mean.dtype == torch.float32
    assert torch.equal(new_count, want_count.float())
    assert (want_count == 0).any()  # some codes got no key: their mean stays mean0
    assert rel_err(new_mean, want_mean) < 1e-5
    torch.testing.assert_close(means, scan.cache_scan(*args), rtol=0, atol=0)
    torch.library.opcheck(scan.cache_scan_fold.op, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="one key"):
        scan.cache_scan_fold(codes[:, :0], values[:, :0].float(), *args[2:])


def fold_case(T, grad_thru_cache, n_invalid, kernels, seed=3):
    """blockwise_attention(fold=True) then the state's cache (advance_state's, folding itself where the attention
    returned None), in float64 off the kernel path and float32 on it: the output, the new count and mean, and the
    gradients of a loss reading both the output and the new mean (a carried state's gradient)."""
    from tvq.ops.cache import advance_state
    from tvq.state import LayerState

    B, H, M, L, S, Dk, Dv = 2, 1, 8, 8, 12, 8, 16
    g = torch.Generator().manual_seed(seed)
    dt = torch.float32 if kernels else F64
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dt).requires_grad_()  # noqa: E731
    q, keys, values, rel, mean0 = r(B, H, T, Dk), r(B, H, M + T, Dk), r(B, H, M + T, Dv), r(H, M + 1, Dk), \
        r(B, H, S, Dv)
    codebook = r(H, S, Dk)
    codes = torch.randint(0, S, (B, H, M + T), generator=g)
    count0 = torch.randint(0, 2, (B, H, S), generator=g).to(dt)
    ninv = torch.tensor([M + 3, 2]) if n_invalid == "rows" else n_invalid
    w_out = torch.randn(B, H, T, Dv, generator=g, dtype=F64)
    w_mean = torch.randn(B, H, S, Dv, generator=g, dtype=F64)
    with use_kernels(kernels):
        out, folded = blockwise.blockwise_attention(
            q, keys, values, codes, n_invalid=ninv, rel=rel, u=torch.zeros(H, Dk, dtype=dt),
            v=torch.zeros(H, Dk, dtype=dt), mem_len=M, block_len=L, agg_cache=True, grad_thru_cache=grad_thru_cache,
            cache=(codebook, count0, mean0), fold=True)
        state = LayerState(keys[:, :, :M], values[:, :, :M], codes[:, :, :M], count0, mean0)
        new = advance_state(state, keys, values, codes, ninv, n_code=S, agg_cache=True,
                            grad_thru_cache=grad_thru_cache, folded=folded)
    loss = (out.double() * w_out).sum() + (new.cache_mean.double() * w_mean).sum()
    leaves = (q, keys, values, mean0)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return folded is not None, out, new.cache_count, new.cache_mean, grads


@pytest.mark.parametrize("grad_thru_cache", [True, False])
@pytest.mark.parametrize("n_invalid", [0, 11, "rows"])
@pytest.mark.parametrize("groups", [1, 2])
def test_blockwise_fold_equals_advance_state(monkeypatch, grad_thru_cache, n_invalid, groups):
    """The kernel path's scan writes the state's cache (T a whole number of blocks): the same count, mean and every
    gradient, the new mean's included (it reaches the values through the cache only with grad_thru_cache, and the
    carried means), as the PyTorch path folding it apart; over one or two row groups of the scan."""
    if groups > 1:
        monkeypatch.setattr(scan, "_CHUNK_BYTES", 1)
    did, *want = fold_case(24, grad_thru_cache, n_invalid, False)
    assert not did  # off the kernel path the caller folds
    did, *got = fold_case(24, grad_thru_cache, n_invalid, True)
    assert did
    for a, b in zip(got[:3], want[:3]):
        assert rel_err(a, b) < 1e-5
    assert torch.equal(got[1], want[1].float())
    for name, a, b in zip(("q", "keys", "values", "mean0"), got[3], want[3]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a, b) < 1e-5, name


def test_blockwise_fold_leaves_a_padded_chunk_to_the_caller():
    """T not a whole number of blocks: the scan's last block holds keys that stay in the window; no fold, the
    caller's (advance_state) gives the same state."""
    did, *got = fold_case(21, True, 0, True)
    _, *want = fold_case(21, True, 0, False)
    assert not did
    for a, b in zip(got[:3], want[:3]):
        assert rel_err(a, b) < 1e-5
