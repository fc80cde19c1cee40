"""What the Triton kernels share: tile sizes and how their ``tl.dot`` products run for a dtype."""

from __future__ import annotations

import os

import torch


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Host code calls this and :func:`cdiv`, not Triton's: those
    are constexpr functions (Triton 3.9) whose every host call costs 3-4 us on the 2-core CPU, several per launch."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (a >= 0, b > 0)."""
    return -(-a // b)


def tile(n: int, most: int) -> int:
    """A tile size for a dim of n: a power of two, at least 16 (``tl.dot``'s minimum), at most ``most``."""
    return max(16, min(most, next_power_of_2(n)))


def dot_options(dtype: torch.dtype) -> dict:
    """The meta-parameters of a kernel's products for operands of ``dtype``: PRECISION "ieee" for float32 (exact,
    as PyTorch's float32 matmul without TF32), else the operands' own tensor-core product; UPCAST True for
    bfloat16 in Triton's interpreter, whose ``tl.dot`` multiplies the raw bits of bfloat16 operands (Triton 3.9):
    there the kernels cast them to float32 first (and PRECISION is "ieee")."""
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return dict(UPCAST=upcast, PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32")
