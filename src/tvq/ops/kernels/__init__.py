"""Fused Triton kernels: the blockwise attention (``scores``, ``cache_scan``: also each block's cache counts,
``window_values``), the per-code sums and the state's cache fold (``code_sums``), the quantizer (``vq_codes``: the
nearest codeword, the straight-through key, the error and key norms), the queries' Transformer-XL biases
(``query_bias``), and the rest of a sublayer (``rms_norm``, ``gate``: the GAU's SiLU and gate, ``residual``:
dropout, LayerDrop and the residual add). Each has a PyTorch twin in :mod:`tvq.ops` or :mod:`tvq.layers` (the reference it
is tested against, outputs and gradients, and the fallback wherever Triton or a GPU is missing).

They are chosen automatically for CUDA tensors in float32, float16 or bfloat16 when Triton imports.
``use_kernels(True)`` forces them for CPU tensors too (which needs ``TRITON_INTERPRET=1`` set before Triton is
imported: how the tests run them without a GPU), ``use_kernels(False)`` turns them off (benchmarks compare both).
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor

HAVE_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_forced: bool | None = None

# custom op name ("tvq_kernels::...") -> its GEMM FLOPs for given arguments, (dtype name, FLOPs): how the cost model
# (tvq.bench.cost) counts a kernel that it cannot look into
KERNEL_FLOPS: dict[str, Callable[..., tuple[str, int]]] = {}


# custom op name -> (launches, scratch bytes) for given arguments, for an op that launches more than one kernel or
# moves a scratch buffer of its own through HBM (written and read inside the op); absent: one launch, no scratch
KERNEL_LAUNCHES: dict[str, Callable[..., tuple[int, int]]] = {}


def register_flops(op_name: str):
    """Decorator: ``fn(*args, **kwargs) -> (dtype name, FLOPs)`` of the kernel op ``op_name``, for the cost model."""
    def register(fn):
        KERNEL_FLOPS[op_name] = fn
        return fn
    return register


def register_launches(op_name: str):
    """Decorator: ``fn(*args, **kwargs) -> (launches, scratch bytes)`` of the kernel op ``op_name``, for the cost
    model (scratch: bytes of the op's own temporaries written and read back, beyond its inputs and outputs)."""
    def register(fn):
        KERNEL_LAUNCHES[op_name] = fn
        return fn
    return register


def kernels_enabled(x: Tensor) -> bool:
    """Whether the Triton path runs for tensors like ``x``: CUDA (or forced), a Triton dtype, Triton installed."""
    if not HAVE_TRITON or x.dtype not in KERNEL_DTYPES:
        return False
    return x.is_cuda if _forced is None else _forced


def graph_capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of t's device (False on a CPU-only build): a
    value drawn on the host then is frozen into every replay (the residual kernel's dropout seed), and a cache kept
    across steps would hold the graph's own memory."""
    return t.is_cuda and torch.backends.cuda.is_built() and torch.cuda.is_current_stream_capturing()


@contextmanager
def use_kernels(enabled: bool):
    """Force the Triton kernels on (also for CPU tensors, through the interpreter) or off inside the block."""
    global _forced
    if enabled and not HAVE_TRITON:
        raise ValueError("use_kernels(True): triton is not installed (pip install 'tvq[triton]')")
    if enabled and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise ValueError("use_kernels(True) without a GPU needs TRITON_INTERPRET=1 set before triton is imported")
    old, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = old
