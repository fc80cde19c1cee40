"""Attention kernels: the quadratic reference (formula and gradient rule), the blockwise linear-time path
(its fast twin), the dense baseline."""

from tvq.ops.blockwise import blockwise_attention
from tvq.ops.dense import dense_attention
from tvq.ops.quadratic import gradient_rule, quadratic_attention, reference_attention

__all__ = ["blockwise_attention", "dense_attention", "gradient_rule", "quadratic_attention", "reference_attention"]
