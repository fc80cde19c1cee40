"""What the Triton kernels share: tile sizes and how their ``tl.dot`` products run for a dtype."""

from __future__ import annotations

import os

import torch
import triton


def tile(n: int, most: int) -> int:
    """A tile size for a dim of n: a power of two, at least 16 (``tl.dot``'s minimum), at most ``most``."""
    return max(16, min(most, triton.next_power_of_2(n)))


def dot_options(dtype: torch.dtype) -> dict:
    """The meta-parameters of a kernel's products for operands of ``dtype``: PRECISION "ieee" for float32 (exact,
    as PyTorch's float32 matmul without TF32), else the operands' own tensor-core product; UPCAST True for
    bfloat16 in Triton's interpreter, whose ``tl.dot`` multiplies the raw bits of bfloat16 operands (Triton 3.9):
    there the kernels cast them to float32 first (and PRECISION is "ieee")."""
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return dict(UPCAST=upcast, PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32")
