"""The attention sublayers' projections: a CPU inference fast path (oneDNN's fused linear), and the GPU path's
weights cast and joined in one launch (:func:`cast_weights`), their gradients written in the weights' own dtype by
the GEMM that computes them (:func:`cast_linear`).

``torch.ops.mkldnn._linear_pointwise`` (oneDNN's matmul with a fused activation or residual add, the
kernel inductor's freezing pass uses) runs bench-small's float32 projections at 195-212 GFLOP/s on
the 2-core CPU where ``F.linear`` (MKL) reaches 174-192, and applies SiLU or the residual add while
the output is still in cache: an 8k-token forward is ~7% faster. The op has no autograd formula,
so it runs only where nothing needs a gradient, on float32 CPU tensors outside autocast; every other
case takes ``F.linear``, which computes the same function.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def _linear_pointwise():
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):  # a build without oneDNN, or an op since renamed
        return None


_LINEAR_POINTWISE = _linear_pointwise()


def _call_onednn(x: Tensor, weight: Tensor, act: str, residual: Tensor | None) -> Tensor:
    if residual is not None:
        return _LINEAR_POINTWISE.binary(x, residual, weight, None, "add")
    return _LINEAR_POINTWISE(x, weight, None, act, [], "")


@torch.library.custom_op("tvq::onednn_linear", mutates_args=())
def _onednn_linear(x: Tensor, weight: Tensor, act: str, residual: Tensor | None) -> Tensor:
    """oneDNN's kernel behind an op of our own for compiled graphs: inductor calls it as it is (it would
    otherwise try its lowering, which expects weights it packed itself). Eager calls the kernel directly
    (a Python custom op adds ~8 us to each call)."""
    return _call_onednn(x, weight, act, residual)


@_onednn_linear.register_fake
def _(x, weight, act, residual):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def fused_linear_ok(x: Tensor, *weights: Tensor) -> bool:
    """Whether :func:`linear` runs oneDNN's fused kernel for these operands."""
    return (
        _LINEAR_POINTWISE is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")  # autocast's linears run in its lower precision
        and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
    )


def linear(x: Tensor, weight: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
    """``act(x @ weight.T) + residual`` with ``act`` None or ``"silu"`` (no bias).

    x (..., D_in), weight (D_out, D_in), residual (..., D_out).
    """
    if act not in (None, "silu"):
        raise ValueError(f"linear: act must be None or 'silu', got {act!r}")
    if act is not None and residual is not None:
        raise ValueError("linear: an activation and a residual together are not supported")
    if fused_linear_ok(x, weight):
        call = _onednn_linear if torch.compiler.is_compiling() else _call_onednn
        return call(x, weight, "swish" if act == "silu" else "none", residual)
    y = F.linear(x, weight)
    if act == "silu":
        y = F.silu(y)
    return y if residual is None else residual + y


_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (PyTorch 2.8 on; CUDA)


def mm_to(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``(a @ b).to(dtype)``: on a GPU one GEMM that writes ``dtype`` (float32 from fp16 / bf16 operands: cuBLAS
    accumulates in float32 anyway, so the float32 result is also the more exact one), elsewhere (or with a PyTorch
    without it) the product cast. a (M, K), b (K, N) -> (M, N)."""
    if a.dtype == dtype:
        return torch.mm(a, b)
    if _MM_OUT_DTYPE and a.is_cuda and dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a, b).to(dtype)


class _CastLinear(torch.autograd.Function):
    """F.linear(x, w_cast), w_cast the rows of ``weights`` stacked and cast (:func:`cast_weights`); backward the
    weights' gradient by one GEMM written in their dtype and split by rows (no cast of it after), x's as F.linear's."""

    @staticmethod
    def forward(ctx, x, w_cast, *weights):
        ctx.save_for_backward(x, w_cast)
        ctx.rows, ctx.dtype = [w.shape[0] for w in weights], weights[0].dtype
        return F.linear(x, w_cast)

    @staticmethod
    def backward(ctx, grad):
        x, w_cast = ctx.saved_tensors
        g_x = grad @ w_cast if ctx.needs_input_grad[0] else None  # (..., D_in)
        g_w = [None] * len(ctx.rows)
        if any(ctx.needs_input_grad[2:]):
            g = grad.reshape(-1, grad.shape[-1])  # (rows, D_out)
            g_w = list(mm_to(g.t(), x.reshape(-1, x.shape[-1]), ctx.dtype).split(ctx.rows))  # (D_out, D_in) split
        return g_x, None, *g_w


def cast_linear(x: Tensor, w_cast: Tensor, weights: list[Tensor]) -> Tensor:
    """``F.linear(x, w_cast)`` for ``w_cast`` the group ``weights`` as :func:`cast_weights` cast it, with the
    gradient going to the weights themselves: computed in their dtype by the weight-gradient GEMM (on a GPU
    a bf16 GEMM writing float32, :func:`mm_to`), where autograd through a cast would write it in the compute dtype
    and cast it after, one more launch and a round trip of every weight's gradient each step.

    x (..., D_in), w_cast (sum of the weights' rows, D_in) -> (..., sum of rows)."""
    if w_cast.shape != (sum(w.shape[0] for w in weights), weights[0].shape[1]):
        raise ValueError(f"cast_linear: w_cast {tuple(w_cast.shape)} is not the weights "
                         f"{[tuple(w.shape) for w in weights]} stacked by rows")
    return _CastLinear.apply(x, w_cast, *weights)


def _cast_outputs(sizes, weights, dtype) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(the groups' outputs (sum rows, D_in) in ``dtype``, their per-weight row slices, the weights): what one
    multi-tensor copy writes."""
    outs, dst, i = [], [], 0
    for n in sizes:
        group = weights[i : i + n]
        rows = [w.shape[0] for w in group]
        out = group[0].new_empty(sum(rows), group[0].shape[1], dtype=dtype)  # (sum rows, D_in)
        outs.append(out)
        dst.extend(out.split(rows))
        i += n
    return outs, dst, list(weights)


def _check_groups(groups: list[list[Tensor]]) -> None:
    for group in groups:
        if not group or len({(w.dtype, w.shape[1]) for w in group}) != 1:
            raise ValueError("cast_weights: each group needs weights of one dtype and one width, got "
                             f"{[(tuple(w.shape), w.dtype) for w in group]}")


def cast_weights(groups: list[list[Tensor]], dtype: torch.dtype,
                 cast: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
    """``tuple(torch.cat([w.to(dtype) for w in group]) for group in groups)`` without gradient: the weights of each
    group (one dtype and width per group) stacked by rows, every group written by one multi-tensor copy (one launch
    on a GPU, where a cast of each weight and a ``cat`` per group are one each). Use each with :func:`cast_linear`
    (or a kernel taking the weights for their gradient), which gives the weights their gradients. ``cast``: those
    groups already cast (:func:`precast_weights`, one launch for the sublayers of a whole model), checked and
    returned."""
    _check_groups(groups)
    if cast is None:
        return tuple(precast_weights([groups], dtype)[0])
    if [(tuple(c.shape), c.dtype) for c in cast] != [
            ((sum(w.shape[0] for w in g), g[0].shape[1]), dtype) for g in groups]:
        raise ValueError(f"cast_weights: cast groups {[(tuple(c.shape), c.dtype) for c in cast]} do not match the "
                         f"weights' in {dtype}")
    return tuple(cast)


def precast_weights(calls: list[list[list[Tensor]]], dtype: torch.dtype) -> list[tuple[Tensor, ...]]:
    """For several :func:`cast_weights` calls' groups, their casts all written by ONE multi-tensor copy, without
    gradient: pass each call its own as ``cast``. A model casts every sublayer's weights once a forward this way
    (one launch instead of one per sublayer); each sublayer's backward writes its weights' gradients in their
    dtype (:func:`cast_linear`), none waiting for another's."""
    outs, dst, srcs = [], [], []
    with torch.no_grad():
        for groups in calls:
            _check_groups(groups)
            o, d, w = _cast_outputs(tuple(len(g) for g in groups), [w for g in groups for w in g], dtype)
            outs.append(tuple(o))
            dst += d
            srcs += w
        if dst:
            torch._foreach_copy_(dst, srcs)
    return outs
