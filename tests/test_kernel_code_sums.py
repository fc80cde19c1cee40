"""The Triton per-code sums (tvq.ops.kernels.code_sums) against the PyTorch code_statistics: counts, sums and the
values' gradient in float32 (against float64) and float16, every valid-mask form, strided values, the custom op's
registration, the fold of the leaving keys into a carried cache (values' and old means' gradients), and the state a
model carries with the kernels on against off. Without a GPU the kernel runs in
Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
from conftest import close_to_reference as close
from conftest import make_model

pytest.importorskip("triton")

from tvq.ops import cache  # noqa: E402
from tvq.ops.kernels import KERNEL_FLOPS, use_kernels  # noqa: E402
from tvq.ops.kernels import code_sums as kcs  # noqa: E402

F64 = torch.float64


def reference(codes, values, valid, n_code):
    """code_statistics on the PyTorch path, float64."""
    with use_kernels(False):
        return cache.code_statistics(codes, values, valid, n_code, F64)


# (lead, N, S, D): S and D not powers of two, several S and D tiles (64 wide), N not a multiple of the key chunk
@pytest.mark.parametrize("lead, N, S, D", [((3,), 20, 8, 24), ((2, 2), 70, 70, 72)])
@pytest.mark.parametrize("mask", ["none", "full", "broadcast"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_matches_code_statistics(lead, N, S, D, mask, dtype, tol):
    g = torch.Generator().manual_seed(N + S)
    codes = torch.randint(0, S, (*lead, N), generator=g)
    values = torch.randn(*lead, N, D, generator=g, dtype=F64)
    valid = {"none": None, "full": torch.rand(*lead, N, generator=g) > 0.3,
             "broadcast": torch.arange(N) >= N // 3}[mask]
    ref = values.clone().requires_grad_()
    want_n, want_s = reference(codes, ref, valid, S)
    grad = torch.randn_like(want_s)
    (want_g,) = torch.autograd.grad(want_s, ref, grad)
    got_in = values.to(dtype).requires_grad_()
    with use_kernels(True):
        got_n, got_s = cache.code_statistics(codes, got_in, valid, S, torch.float32)
    (got_g,) = torch.autograd.grad(got_s, got_in, grad.float())
    assert got_n.dtype == got_s.dtype == torch.float32 and got_g.dtype == dtype
    assert torch.equal(got_n.to(F64), want_n)  # counts are exact
    want_s_in = reference(codes, values.to(dtype).to(F64), valid, S)[1]  # the sums of the rounded values
    close(got_s, want_s_in, 1e-5)
    close(got_g, want_g, tol)


def test_strided_values_are_read_in_place():
    """advance_state passes the leaving values as a view of the window list (rows strided)."""
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 1, 40, 24, generator=g)
    codes = torch.randint(0, 16, (2, 1, 30), generator=g)
    values = full[:, :, :30]  # (2, 1, 30, 24), not contiguous
    with use_kernels(True):
        n, s = cache.code_statistics(codes, values, None, 16, torch.float32)
    want_n, want_s = reference(codes, values.to(F64), None, 16)
    assert torch.equal(n.to(F64), want_n)
    close(s, want_s, 1e-5)


def test_empty_inputs():
    with use_kernels(True):
        n, s = cache.code_statistics(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 8), None, 4,
                                     torch.float32)
    assert n.shape == (2, 4) and s.shape == (2, 4, 8) and not n.any() and not s.any()


def test_opcheck_and_flops():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 8, (2, 20), generator=g)
    values = torch.randn(2, 20, 24, generator=g)
    valid = torch.rand(2, 20, generator=g) > 0.5
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(kcs.code_sums.op, (codes, values, valid, 8), test_utils=utils)
    torch.library.opcheck(kcs.code_sums.op, (codes, values, None, 8), test_utils=utils)
    assert KERNEL_FLOPS["tvq_kernels::code_sums"](codes, values, valid, 8) == ("float32", 2 * 40 * 8 * 24)


@pytest.mark.parametrize("n_invalid", [0, 7, "per row"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_cache_fold_matches_statistics_then_merge(n_invalid, dtype, tol):
    """cache_fold_kernel = code_statistics + merge_cache (float64): counts exactly, means, and the gradients of the
    leaving values and of the old means, with strided values and empty slots."""
    g = torch.Generator().manual_seed(5)
    B, H, N, S, D = 2, 3, 30, 20, 72
    codes = torch.randint(0, S, (B, H, N + 6), generator=g)[:, :, :N]
    values = torch.randn(B, H, N + 6, D, generator=g, dtype=F64)[:, :, :N]
    count = torch.randint(0, 5, (B, H, S), generator=g).to(F64)
    mean = torch.randn(B, H, S, D, generator=g, dtype=F64)
    first = torch.tensor([2, 13]) if n_invalid == "per row" else n_invalid
    grad = torch.randn(B, H, S, D, generator=g, dtype=F64)

    v_ref, m_ref = values.clone().requires_grad_(), mean.clone().requires_grad_()
    valid = torch.arange(N) >= (first[:, None, None] if isinstance(first, torch.Tensor) else first)
    n, s_ = reference(codes, v_ref, valid, S)
    want_c, want_m = cache.merge_cache(count, m_ref, n, s_)
    want_gv, want_gm = torch.autograd.grad(want_m, (v_ref, m_ref), grad)

    v_in, m_in = values.to(dtype).requires_grad_(), mean.float().requires_grad_()
    with use_kernels(True):
        got_c, got_m = kcs.cache_fold_kernel(codes, v_in, first, count.float(), m_in)
    got_gv, got_gm = torch.autograd.grad(got_m, (v_in, m_in), grad.float())
    assert got_c.dtype == got_m.dtype == torch.float32 and got_gv.dtype == dtype
    assert torch.equal(got_c.to(F64), want_c)
    close(got_m, want_m, tol)
    close(got_gv, want_gv, tol)
    close(got_gm, want_gm, 1e-5)
    args = (codes.flatten(0, 1), v_in.detach().flatten(0, 1), None, 3, count.float().flatten(0, 1),
            m_in.detach().flatten(0, 1))
    torch.library.opcheck(kcs.cache_fold.op, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="cache_fold_kernel"):
        kcs.cache_fold_kernel(codes, v_in, first, count.float()[..., 1:], m_in)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_walk_split_into_chunks_matches(monkeypatch, dtype, tol):
    """Where the grid is small the keys are summed in chunks and the partials added in order: the same counts
    (exactly) and sums as one walk, and as the float64 reference, for the statistics (with a valid mask) and the
    cache fold (per-row empty slots), gradients included."""
    g = torch.Generator().manual_seed(7)
    B, H, N, S, D = 2, 1, 150, 20, 72
    codes = torch.randint(0, S, (B, H, N), generator=g)
    values = torch.randn(B, H, N, D, generator=g, dtype=F64)
    valid = torch.rand(B, H, N, generator=g) > 0.2
    count = torch.randint(0, 5, (B, H, S), generator=g).to(F64)
    mean = torch.randn(B, H, S, D, generator=g, dtype=F64)
    first = torch.tensor([3, 40])
    grad = torch.randn(B, H, S, D, generator=g, dtype=F64)

    def run():
        v_in, m_in = values.to(dtype).requires_grad_(), mean.float().requires_grad_()
        with use_kernels(True):
            n, s_ = cache.code_statistics(codes, v_in, valid, S, torch.float32)
            c, m = kcs.cache_fold_kernel(codes, v_in, first, count.float(), m_in)
        gv, gm = torch.autograd.grad((s_ * grad.float()).sum() + (m * grad.float()).sum(), (v_in, m_in))
        return n, s_, c, m, gv, gm

    one = run()
    monkeypatch.setattr(kcs, "SPLIT_BELOW_PROGRAMS", 10**9)
    monkeypatch.setattr(kcs, "MIN_CHUNK_KEYS", 1)
    assert kcs._chunks(B * H, N, S, D, *kcs._tiles(N, S, D))[0] == 5  # 150 keys in chunks of 32
    assert kcs._launches(codes.flatten(0, 1), values.flatten(0, 1), S) == (2, 2 * 5 * B * H * S * (D + 1) * 4)
    split = run()
    assert torch.equal(split[0], one[0]) and torch.equal(split[2], one[2])  # counts exact
    for a, b in zip(split, one):
        close(a, b.double(), 1e-5)
    want_n, want_s = reference(codes, values.to(dtype).to(F64), valid, S)
    assert torch.equal(split[0].to(F64), want_n)
    close(split[1], want_s, 1e-5)
    keep = torch.arange(N) >= first[:, None, None]
    want_c, want_m = cache.merge_cache(count, mean, *reference(codes, values.to(dtype).to(F64), keep, S))
    assert torch.equal(split[2].to(F64), want_c)
    close(split[3], want_m, tol)


def test_model_state_with_kernels_matches():
    """A vq model's forward carries the same cache (counts and means) and output with the kernels on as off."""
    model = make_model(dtype=torch.float32)
    x = torch.randint(0, 50, (2, 48), generator=torch.Generator().manual_seed(0))
    with use_kernels(False):
        want = model(x[:, 24:], state=model(x[:, :24]).state)  # the second chunk merges into a carried cache
    with use_kernels(True):
        got = model(x[:, 24:], state=model(x[:, :24]).state)
    close(got.logits, want.logits, 1e-5)
    for a, b in zip(got.state.layers, want.state.layers):
        assert torch.equal(a.cache_count, b.cache_count)
        close(a.cache_mean, b.cache_mean, 1e-5)
