"""The key-list join kernel (tvq.ops.kernels.window_join): the state's window slots then the chunk's keys, values
and codes, equal to the three ``torch.cat`` of tvq.ops.cache.join_window's PyTorch path, outputs and gradients, for
strided chunks (the values' transposed view), a wider state (float32 under float16), several row tiles, an empty
window or chunk; each block's cache counts from the same launch, equal to tvq.ops.cache.block_counts'; the custom
op's registrations. On a CPU through Triton's interpreter (conftest sets
TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tvq.ops.cache import join_window  # noqa: E402
from tvq.ops.kernels import use_kernels  # noqa: E402
from tvq.ops.kernels import window_join as kjoin  # noqa: E402
from tvq.state import LayerState  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

B, H, DK, DV, S = 2, 3, 8, 20, 7


def chunk_and_state(M, T, dtype, state_dtype, seed=0):
    """Leaves: state keys/values (state_dtype), chunk keys (B, H, T, D_k) and values as the attention has them: a
    transposed view of a (B, T, H D_v) projection; int64 codes (the chunk's strided too)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    sk, sv = r(B, H, M, DK).to(state_dtype), r(B, H, M, DV).to(state_dtype)
    k = r(B, H, T, DK).to(dtype)
    proj = r(B, T, H * DV).to(dtype)
    codes_bth = torch.randint(0, S, (B, T, H), generator=gen)
    sc = torch.randint(0, S, (B, H, M), generator=gen)
    return [sk, k, sv, proj], sc, codes_bth.transpose(1, 2)


def run(leaves, sc, c, kernels):
    sk, k, sv, proj = [x.detach().clone().requires_grad_() for x in leaves]
    B_, T, _ = proj.shape
    v = proj.view(B_, T, H, DV).transpose(1, 2)  # (B, H, T, D_v), strided
    state = LayerState(sk, sv, sc)
    with use_kernels(kernels):
        keys, values, codes, _ = join_window(state, k, v, c)
    gen = torch.Generator().manual_seed(9)
    gk, gv = torch.randn(keys.shape, generator=gen).to(keys.dtype), torch.randn(values.shape, generator=gen).to(
        values.dtype)
    grads = torch.autograd.grad((keys, values), (sk, k, sv, proj), (gk, gv))
    return (keys, values, codes), grads


@pytest.mark.parametrize("M,T", [(5, 11), (16, 3), (0, 6), (4, 0)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_join_equals_the_cats(monkeypatch, M, T, dtype, state_dtype):
    monkeypatch.setattr(kjoin, "BLOCK_ROWS", 4)  # several row tiles, a partial last one
    leaves, sc, c = chunk_and_state(M, T, dtype, state_dtype)
    want, want_grads = run(leaves, sc, c, False)
    got, got_grads = run(leaves, sc, c, True)
    for g, w in zip(got, want):  # a copy: exact
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
        assert torch.equal(g, w)
    for g, w in zip(got_grads, want_grads):  # slices of the gradients, the state's cast back
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_a_state_without_gradient_and_the_op_registrations():
    leaves, sc, c = chunk_and_state(6, 5, torch.float32, torch.float32, seed=3)
    sk, k, sv, proj = leaves
    v = proj.view(B, 5, H, DV).transpose(1, 2)
    k.requires_grad_()
    with use_kernels(True):
        keys, values, codes, _ = join_window(LayerState(sk, sv, sc), k, v, c)
    assert not codes.requires_grad and keys.requires_grad
    (g_k,) = torch.autograd.grad(keys.sum(), (k,))
    assert torch.equal(g_k, torch.ones_like(k))
    torch.library.opcheck(kjoin.window_join.op, (sk, k.detach(), sv, v, sc, c))


def test_bad_shapes_are_refused():
    leaves, sc, c = chunk_and_state(4, 3, torch.float32, torch.float32)
    sk, k, sv, proj = leaves
    v = proj.view(B, 3, H, DV).transpose(1, 2)
    with pytest.raises(ValueError, match="window_join_kernel"):
        kjoin.window_join_kernel(sk, k[:, :1], sv, v, sc, c)
    with pytest.raises(ValueError, match="int64 codes"):
        kjoin.window_join_kernel(sk, k, sv, v, sc.int(), c)


@pytest.mark.parametrize("M, T, block_len, n_invalid", [(8, 24, 8, 0), (8, 21, 8, 11), (3, 21, 8, "rows"),
                                                        (8, 5, 16, 2), (0, 16, 4, 0)],
                         ids=["whole", "padded", "padding-past-the-list", "one-short-block", "no-window"])
def test_block_counts_from_the_join_launch(monkeypatch, M, T, block_len, n_invalid):
    """join_window(block_len=...): each block's cache counts (B, H, nb, S) written by the join's launch (its programs
    past the row tiles), equal to block_counts of the joined list (the PyTorch path's), empty slots not counted (one
    count or one per row), whatever the list's length against the blocks'; the lists unchanged."""
    from tvq.ops.cache import block_counts, block_grid

    monkeypatch.setattr(kjoin, "BLOCK_ROWS", 4)
    leaves, sc, c = chunk_and_state(M, T, torch.float32, torch.float32, seed=T)
    sk, k, sv, proj = leaves
    v = proj.view(B, T, H, DV).transpose(1, 2)
    count0 = torch.randint(0, 4, (B, H, S), generator=torch.Generator().manual_seed(1)).float()
    ninv = torch.tensor([M + 2, 1]) if n_invalid == "rows" else n_invalid
    state = LayerState(sk, sv, sc, count0, torch.zeros(B, H, S, DV))
    outs = {}
    for kernels in (False, True):
        with use_kernels(kernels):
            outs[kernels] = join_window(state, k, v, c, block_len=block_len, n_invalid=ninv)
    (*want, want_n), (*got, got_n) = outs[False], outs[True]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    L, nb = block_grid(T, block_len)
    assert got_n.shape == (B, H, nb, S) and got_n.dtype == torch.float32
    assert torch.equal(got_n, want_n)
    if (M + T) >= nb * L:  # the list covers every block: the counts' own kernel on it
        assert torch.equal(got_n, block_counts(want[2][:, :, :nb * L], ninv, count0, L))
    assert join_window(state, k, v, c)[3] is None  # not asked: none
    first = ninv.to(torch.int32) if isinstance(ninv, torch.Tensor) else None
    torch.library.opcheck(kjoin.window_join.op, (sk, k.detach(), sv, v, sc, c, count0, first,
                                                 0 if first is not None else ninv, nb, L))
