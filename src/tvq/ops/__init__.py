"""Attention kernels: the quadratic reference and the blockwise linear-time path."""

from tvq.ops.blockwise import blockwise_attention
from tvq.ops.quadratic import quadratic_attention

__all__ = ["blockwise_attention", "quadratic_attention"]
