"""The nearest codeword of every key as one Triton kernel (the kernel twin of the distance product and argmin in
:meth:`tvq.layers.vq.VectorQuantizer.forward`).

code = argmin_s ||k - c_s||^2 = argmin_s (||c_s||^2 - 2 k . c_s), in float32 (the codes are float32's argmin, under
autocast too). In PyTorch that is a (T, S) float32 distance matrix written by a batched GEMM and read back by an
argmin: 8 bytes per (key, code) pair, 4 KB per key at S 512 (enwik8), against the key's own 256 bytes. Here a
program owns a tile of BT keys of one head, walks the codebook in tiles of BS codes (``tl.dot`` in float32, "ieee"
precision: as PyTorch's float32 matmul without TF32) and keeps each key's running minimum and its index on chip:
only the codes (8 bytes per key) are written. Ties go to the lowest index, as ``torch.argmin``'s; distances equal
to float32 rounding may still resolve differently from PyTorch's product, whose sums run in another order.

The squared norms of the codewords (H, S) are an input (computed once per forward from the codebook, which is
small); the codebook is read per key tile (S D_k float32: 256 KB at S 512, D_k 128, from L2 after the first tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tvq.ops.kernels import register_flops
from tvq.ops.kernels.common import tile

TILES = {"keys": 32, "codes": 32}  # largest tiles of keys and codes: 32 x 32 float32 products do not spill (sm_90)


@triton.jit
def _codes_kernel(k_ptr, c_ptr, n_ptr, out_ptr, H, T, S, Dk, sk_b, sk_h, sk_t,
                  BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr):
    """codes of BT keys of one (b, h): the running argmin over codebook tiles of ||c||^2 - 2 k . c."""
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
        norm = tl.load(n_ptr + h * S + s, mask=s_ok, other=float("inf"))  # (BS,), inf past S
        dist = norm[None, :] - 2.0 * tl.dot(k, c, input_precision="ieee")  # (BT, BS)
        tile_min = tl.min(dist, axis=1)  # (BT,)
        tile_arg = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int64) + s0  # (BT,)
        better = tile_min < best  # strictly: an equal later code does not replace an earlier one
        best_s = tl.where(better, tile_arg, best_s)
        best = tl.where(better, tile_min, best)
    tl.store(out_ptr + bh * T + t, best_s, mask=t_ok)


@torch.library.custom_op("tvq_kernels::vq_codes", mutates_args=())
def vq_codes(k: Tensor, codebook: Tensor, sq_norms: Tensor) -> Tensor:
    """(B, H, T) int64: argmin_s (sq_norms[h, s] - 2 k[b, h, t] . codebook[h, s]) in float32.

    k (B, H, T, D_k) any float dtype (its last dim dense), codebook (H, S, D_k) and sq_norms (H, S) float32."""
    B, H, T, Dk = k.shape
    S = codebook.shape[1]
    out = torch.empty(B, H, T, dtype=torch.long, device=k.device)
    if not out.numel():
        return out
    if k.stride(-1) != 1:
        k = k.contiguous()
    BT, BS, BK = tile(T, TILES["keys"]), tile(S, TILES["codes"]), tile(Dk, 1 << 30)
    _codes_kernel[(B * H * triton.cdiv(T, BT),)](k, codebook.contiguous(), sq_norms.contiguous(), out, H, T, S, Dk,
                                                 k.stride(0), k.stride(1), k.stride(2), BT=BT, BS=BS, BK=BK)
    return out


@vq_codes.register_fake
def _(k, codebook, sq_norms):
    B, H, T, _ = k.shape
    return torch.empty(B, H, T, dtype=torch.long, device=k.device)


@register_flops("tvq_kernels::vq_codes")
def _(k, codebook, sq_norms):
    """(T, D_k) @ (D_k, S) per (b, h), in float32."""
    B, H, T, Dk = k.shape
    return "float32", 2 * B * H * T * Dk * codebook.shape[1]


def vq_codes_kernel(k: Tensor, codebook: Tensor) -> Tensor:
    """The code of each key: (B, H, T) int64, argmin_s ||k - codebook[h, s]||^2 in float32 (no gradient).

    k (B, H, T, D_k), codebook (H, S, D_k)."""
    if k.dim() != 4 or codebook.dim() != 3 or codebook.shape[0] != k.shape[1] or codebook.shape[2] != k.shape[3]:
        raise ValueError(f"vq_codes_kernel: k (B, H, T, D_k) and codebook (H, S, D_k) expected, got "
                         f"{tuple(k.shape)} and {tuple(codebook.shape)}")
    c = codebook.detach().float()
    return vq_codes(k.detach(), c, c.square().sum(-1))
