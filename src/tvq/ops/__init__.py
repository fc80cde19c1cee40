"""Attention kernels: the quadratic reference, the blockwise linear-time path, the dense baseline."""

from tvq.ops.blockwise import blockwise_attention
from tvq.ops.dense import dense_attention
from tvq.ops.quadratic import quadratic_attention

__all__ = ["blockwise_attention", "dense_attention", "quadratic_attention"]
