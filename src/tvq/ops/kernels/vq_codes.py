"""Vector quantization as Triton kernels (the kernel twin of :meth:`tvq.layers.vq.VectorQuantizer.forward`): each
key's nearest codeword, and with it the quantized key, its squared error and its squared norm, forward and backward.

code = argmin_s ||k - c_s||^2 = argmin_s (||c_s||^2 - 2 k . c_s), in float32 (the codes are float32's argmin, under
autocast too). In PyTorch that is a (T, S) float32 distance matrix written by a batched GEMM and read back by an
argmin: 8 bytes per (key, code) pair, 4 KB per key at S 512 (enwik8), against the key's own 256 bytes. Here a
program owns a tile of BT keys of one head, walks the codebook in tiles of BS codes (``tl.dot`` in float32, "ieee"
precision: as PyTorch's float32 matmul without TF32) and keeps each key's running minimum and its index on chip:
only the codes (8 bytes per key) are written. Ties go to the lowest index, as ``torch.argmin``'s; distances equal
to float32 rounding may still resolve differently from PyTorch's product, whose sums run in another order. The
codewords' squared norms are summed from the tile the product reads (no (H, S) input to compute first); the
codebook is read per key tile (S D_k float32: 256 KB at S 512, D_k 128, from L2 after the first tile).

:func:`quantize_kernel` is the whole quantizer in one kernel each way. Forward: with the code found, the program
gathers its codeword, casts it to the keys' dtype (as the PyTorch path's ``c.to(k.dtype)``) and writes it (the
straight-through key's value), ||k - c_z||^2 (the commitment term) and ||k||^2 (the codebook statistics) in float32,
and the commitment loss (their mean over tokens): each program's sum added up by the launch's last program
(:func:`tvq.ops.kernels.common.last_program`), where a ``mean`` would be one more launch per sublayer.
In PyTorch that is about 20 kernels (the codebook cast, the gather, the straight-through sub and add, the error's
sub, square and sums, the key norms' cast, square and sum, and their backward). Backward: dk = d(k_st) +
2 d(err) (k - c_z), the codeword gathered again from the codes (nothing but k and the codes saved).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import kernel_op, register_flops
from tvq.ops.kernels.common import cdiv, last_program, tickets, tile

TILES = {"keys": 32, "codes": 32}  # largest tiles of keys and codes: 32 x 32 float32 products do not spill (sm_90)
PARTS = 256  # partial sums the last program adds per step (the commitment loss's reduction)


@triton.jit
def _codes_kernel(k_ptr, c_ptr, out_ptr, cz_ptr, err_ptr, ksq_ptr, part_ptr, mean_ptr, ticket_ptr, mean_scale, H, T,
                  S, Dk, sk_b, sk_h, sk_t, QUANT: tl.constexpr, MEAN: tl.constexpr, BT: tl.constexpr,
                  BS: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr):
    """codes of BT keys of one (b, h): the running argmin over codebook tiles of ||c||^2 - 2 k . c; with QUANT
    also the codeword in k's dtype (contiguous (B, H, T, D_k)), ||k - c_z||^2 and ||k||^2 (float32 (B, H, T)); with
    MEAN the errors' sum times mean_scale (float32 ()): each program's sum to part[pid], added up by the last
    program (in pid order, BP at a time: deterministic)."""
    pid = tl.program_id(0).to(tl.int64)
    n_t = tl.cdiv(T, BT)
    tt, bh = pid % n_t, pid // n_t
    b, h = bh // H, bh % H
    t = tt * BT + tl.arange(0, BT)  # (BT,)
    j = tl.arange(0, BK)  # (BK,) the key's dims (BK >= D_k: one tile)
    t_ok, j_ok = t < T, j < Dk
    k = tl.load(k_ptr + b * sk_b + h * sk_h + t[:, None] * sk_t + j[None, :], mask=t_ok[:, None] & j_ok[None, :],
                other=0.0).to(tl.float32)  # (BT, BK)
    best = tl.full((BT,), float("inf"), dtype=tl.float32)
    best_s = tl.zeros((BT,), dtype=tl.int64)
    for s0 in range(0, S, BS):
        s = s0 + tl.arange(0, BS)  # (BS,)
        s_ok = s < S
        c = tl.load(c_ptr + (h * S + s[None, :]) * Dk + j[:, None], mask=j_ok[:, None] & s_ok[None, :],
                    other=0.0).to(tl.float32)  # (BK, BS): the codebook tile transposed
        norm = tl.where(s_ok, tl.sum(c * c, axis=0), float("inf"))  # (BS,) ||c_s||^2, inf past S
        dist = norm[None, :] - 2.0 * tl.dot(k, c, input_precision="ieee")  # (BT, BS)
        tile_min = tl.min(dist, axis=1)  # (BT,)
        tile_arg = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int64) + s0  # (BT,)
        better = tile_min < best  # strictly: an equal later code does not replace an earlier one
        best_s = tl.where(better, tile_arg, best_s)
        best = tl.where(better, tile_min, best)
    tl.store(out_ptr + bh * T + t, best_s, mask=t_ok)
    if QUANT:
        ok = t_ok[:, None] & j_ok[None, :]
        cz = tl.load(c_ptr + (h * S + best_s[:, None]) * Dk + j[None, :], mask=ok, other=0.0)  # (BT, BK) float32
        cz = cz.to(cz_ptr.dtype.element_ty)  # the codeword in k's dtype, as the straight-through key holds it
        tl.store(cz_ptr + (bh * T + t[:, None]) * Dk + j[None, :], cz, mask=ok)
        diff = k - cz.to(tl.float32)  # (BT, BK), zero past T
        err = tl.sum(diff * diff, axis=1)  # (BT,)
        tl.store(err_ptr + bh * T + t, err, mask=t_ok)
        tl.store(ksq_ptr + bh * T + t, tl.sum(k * k, axis=1), mask=t_ok)
        if MEAN:
            tl.store(part_ptr + pid, tl.sum(err, axis=0))
            n = tl.num_programs(0)
            if last_program(ticket_ptr, n):
                acc = tl.zeros((BP,), dtype=tl.float32)
                for i0 in range(0, n, BP):
                    i = i0 + tl.arange(0, BP)
                    acc += tl.load(part_ptr + i, mask=i < n, other=0.0, cache_modifier=".cg")
                tl.store(mean_ptr, tl.sum(acc, axis=0) * mean_scale)


@triton.jit
def _quantize_bwd_kernel(k_ptr, c_ptr, code_ptr, dst_ptr, derr_ptr, dmean_ptr, dk_ptr, mean_scale, H, T, S, Dk,
                         sk_b, sk_h, sk_t, sd_b, sd_h, sd_t, HAS_DST: tl.constexpr, HAS_DERR: tl.constexpr,
                         HAS_DMEAN: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """dk of BT keys of one (b, h): d(k_st) + 2 d(err) (k - c_z), c_z the codeword in k's dtype; d(err) the
    per-key gradient plus (HAS_DMEAN) the gradient of a mean of the errors, dmean[0] * mean_scale."""
    pid = tl.program_id(0).to(tl.int64)
    n_t = tl.cdiv(T, BT)
    tt, bh = pid % n_t, pid // n_t
    b, h = bh // H, bh % H
    t = tt * BT + tl.arange(0, BT)  # (BT,)
    j = tl.arange(0, BK)  # (BK,)
    t_ok = t < T
    ok = t_ok[:, None] & (j < Dk)[None, :]
    dk = tl.zeros((BT, BK), dtype=tl.float32)
    if HAS_DST:
        dk += tl.load(dst_ptr + b * sd_b + h * sd_h + t[:, None] * sd_t + j[None, :], mask=ok,
                      other=0.0).to(tl.float32)
    if HAS_DERR or HAS_DMEAN:
        k = tl.load(k_ptr + b * sk_b + h * sk_h + t[:, None] * sk_t + j[None, :], mask=ok, other=0.0)
        code = tl.load(code_ptr + bh * T + t, mask=t_ok, other=0)  # (BT,)
        cz = tl.load(c_ptr + (h * S + code[:, None]) * Dk + j[None, :], mask=ok, other=0.0).to(k.dtype)
        derr = tl.zeros((BT,), dtype=tl.float32)
        if HAS_DERR:
            derr += tl.load(derr_ptr + bh * T + t, mask=t_ok, other=0.0).to(tl.float32)  # (BT,)
        if HAS_DMEAN:
            derr += tl.load(dmean_ptr).to(tl.float32) * mean_scale
        dk += 2.0 * derr[:, None] * (k.to(tl.float32) - cz.to(tl.float32))
    tl.store(dk_ptr + (bh * T + t[:, None]) * Dk + j[None, :], dk.to(dk_ptr.dtype.element_ty), mask=ok)


def _launch(k: Tensor, codebook: Tensor, quant: bool, mean: bool = False) -> tuple[Tensor, ...]:
    B, H, T, Dk = k.shape
    S = codebook.shape[1]
    codes = torch.empty(B, H, T, dtype=torch.long, device=k.device)
    outs = (torch.empty(B, H, T, Dk, dtype=k.dtype, device=k.device),
            *(torch.empty(B, H, T, dtype=torch.float32, device=k.device) for _ in range(2))) if quant else ()
    mean_err = torch.empty((), dtype=torch.float32, device=k.device) if quant else None
    if not codes.numel():
        return (codes, *outs, mean_err.fill_(float("nan"))) if quant else (codes,)  # a mean of nothing
    if k.stride(-1) != 1:
        k = k.contiguous()
    BT, BS, BK = tile(T, TILES["keys"]), tile(S, TILES["codes"]), tile(Dk, 1 << 30)
    grid = B * H * cdiv(T, BT)
    parts = torch.empty(grid, dtype=torch.float32, device=k.device) if mean else codes
    dummy = outs or (codes,) * 3  # pointers never written without QUANT
    _codes_kernel[(grid,)](k, codebook.contiguous(), codes, *dummy, parts, codes if mean_err is None else mean_err,
                           tickets(k.device) if mean else codes, 1.0 / (B * T), H, T, S, Dk, k.stride(0), k.stride(1),
                           k.stride(2), QUANT=quant, MEAN=mean, BT=BT, BS=BS, BK=BK, BP=tile(grid, PARTS))
    return (codes, *outs, mean_err) if quant else (codes,)


def _flops(k: Tensor, codebook: Tensor) -> tuple[str, int]:
    """(T, D_k) @ (D_k, S) per (b, h), in float32."""
    B, H, T, Dk = k.shape
    return "float32", 2 * B * H * T * Dk * codebook.shape[1]


@kernel_op("tvq_kernels::vq_codes")
def vq_codes(k: Tensor, codebook: Tensor) -> Tensor:
    """(B, H, T) int64: argmin_s ||k[b, h, t] - codebook[h, s]||^2 in float32.

    k (B, H, T, D_k) any float dtype (its last dim dense), codebook (H, S, D_k) float32."""
    return _launch(k, codebook, False)[0]


@vq_codes.register_fake
def _(k, codebook):
    B, H, T, _ = k.shape
    return torch.empty(B, H, T, dtype=torch.long, device=k.device)


register_flops("tvq_kernels::vq_codes")(_flops)


@kernel_op("tvq_kernels::vq_quantize")
def vq_quantize(k: Tensor, codebook: Tensor, mean: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(codes (B, H, T) int64, c_z (B, H, T, D_k) in k's dtype, ||k - c_z||^2 and ||k||^2 (B, H, T) float32, and
    with ``mean`` the errors summed over heads and averaged over (B, T), float32 () (else undefined)): the codes as
    :func:`vq_codes`', c_z their codewords cast to k's dtype (the error uses that cast)."""
    return _launch(k, codebook, True, mean)


@vq_quantize.register_fake
def _(k, codebook, mean=False):
    B, H, T, Dk = k.shape
    return (torch.empty(B, H, T, dtype=torch.long, device=k.device),
            torch.empty(B, H, T, Dk, dtype=k.dtype, device=k.device),
            *(torch.empty(B, H, T, dtype=torch.float32, device=k.device) for _ in range(2)),
            torch.empty((), dtype=torch.float32, device=k.device))


@register_flops("tvq_kernels::vq_quantize")
def _(k, codebook, mean=False):
    return _flops(k, codebook)


@kernel_op("tvq_kernels::vq_quantize_backward")
def vq_quantize_backward(k: Tensor, codebook: Tensor, codes: Tensor, grad_keys: Tensor | None,
                         grad_err: Tensor | None, grad_mean: Tensor | None = None, mean_scale: float = 0.0) -> Tensor:
    """dk (B, H, T, D_k) contiguous, k's dtype: grad_keys + 2 (grad_err + grad_mean mean_scale) (k - c_z) (float32
    math); a None gradient is zeros. k and grad_keys (B, H, T, D_k) any strides with a dense last dim, codes and
    grad_err (B, H, T), grad_mean () the gradient of a mean of the errors (one scalar, read on the device)."""
    B, H, T, Dk = k.shape
    dk = torch.empty(B, H, T, Dk, dtype=k.dtype, device=k.device)
    if not dk.numel():
        return dk
    if k.stride(-1) != 1:
        k = k.contiguous()
    dst = k if grad_keys is None else grad_keys if grad_keys.stride(-1) == 1 else grad_keys.contiguous()
    derr = codes if grad_err is None else grad_err.contiguous()
    BT, BK = tile(T, TILES["keys"]), tile(Dk, 1 << 30)
    _quantize_bwd_kernel[(B * H * cdiv(T, BT),)](
        k, codebook.contiguous(), codes.contiguous(), dst, derr, codes if grad_mean is None else grad_mean, dk,
        mean_scale, H, T, codebook.shape[1], Dk, *k.stride()[:3], *dst.stride()[:3], HAS_DST=grad_keys is not None,
        HAS_DERR=grad_err is not None, HAS_DMEAN=grad_mean is not None, BT=BT, BK=BK)
    return dk


@vq_quantize_backward.register_fake
def _(k, codebook, codes, grad_keys, grad_err, grad_mean=None, mean_scale=0.0):
    return torch.empty(k.shape, dtype=k.dtype, device=k.device)


class _Quantize(torch.autograd.Function):
    """(k_st, codes, err, k_sq, mean_err): k_st's value is c_z, its gradient passes to k (straight-through); err's
    gradient 2 (k - c_z) d(err); mean_err (with ``mean``, else None) the errors summed over heads and averaged over
    (B, T), its gradient read by the backward kernel as one scalar (no (B, H, T) expansion of it); codes and k_sq
    have none. Saves k and the codes."""

    @staticmethod
    def forward(ctx, k, codebook, mean):
        ctx.set_materialize_grads(False)
        codes, c_z, err, k_sq, mean_err = vq_quantize(k, codebook, mean)  # mean_err: the kernel's own reduction
        ctx.mark_non_differentiable(codes, k_sq)
        ctx.save_for_backward(k, codebook, codes)
        B, H, T = codes.shape
        ctx.mean_scale = 1.0 / max(B * T, 1)
        return c_z, codes, err, k_sq, mean_err if mean else None

    @staticmethod
    def backward(ctx, d_keys, _d_codes, d_err, _d_ksq, d_mean):
        if not ctx.needs_input_grad[0] or (d_keys is None and d_err is None and d_mean is None):
            return None, None, None
        k, codebook, codes = ctx.saved_tensors
        return vq_quantize_backward(k, codebook, codes, d_keys, d_err, d_mean, ctx.mean_scale), None, None


def _check(k: Tensor, codebook: Tensor, name: str) -> None:
    if k.dim() != 4 or codebook.dim() != 3 or codebook.shape[0] != k.shape[1] or codebook.shape[2] != k.shape[3]:
        raise ValueError(f"{name}: k (B, H, T, D_k) and codebook (H, S, D_k) expected, got {tuple(k.shape)} and "
                         f"{tuple(codebook.shape)}")


def vq_codes_kernel(k: Tensor, codebook: Tensor) -> Tensor:
    """The code of each key: (B, H, T) int64, argmin_s ||k - codebook[h, s]||^2 in float32 (no gradient).

    k (B, H, T, D_k), codebook (H, S, D_k)."""
    _check(k, codebook, "vq_codes_kernel")
    return vq_codes(k.detach(), codebook.detach().float())


def quantize_kernel(k: Tensor, codebook: Tensor, mean: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The quantizer in one kernel each way -> (k_st (B, H, T, D_k) in k's dtype, codes (B, H, T) int64,
    err (B, H, T) float32 = ||k - c_z||^2, k_sq (B, H, T) float32 = ||k||^2, and with ``mean`` the commitment
    loss err.sum(1).mean() (float32 (), summed in the same launch, its gradient taken by the backward kernel as it
    is), else None).

    k_st's value is the codeword c_z (cast to k's dtype) and its gradient passes to k unchanged (straight-through);
    err's gradient flows to k only (the codebook is a stop-gradient: its EMA update is not a gradient step).
    k (B, H, T, D_k), codebook (H, S, D_k) (used in float32)."""
    _check(k, codebook, "quantize_kernel")
    return _Quantize.apply(k, codebook.detach().float(), mean)
