"""The attention sublayers' projections: a CPU inference fast path (oneDNN's fused linear), and the GPU path's
weights cast and joined in one launch (:func:`cast_weights`).

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


class _CastWeights(torch.autograd.Function):
    """Groups of weights in ``dtype``, each group's weights (rows, D_in) stacked by rows, all written by one
    multi-tensor copy (one launch on a GPU, where a cast of each weight and a ``cat`` per group are one launch
    each), or given already cast (``cast``: :func:`precast_weights`'s, no launch); backward one multi-tensor copy of
    the groups' gradients into the weights' dtype (a group with no gradient gives its weights none)."""

    @staticmethod
    def forward(ctx, dtype, sizes, cast, *weights):
        if cast is not None:  # new tensors over the copies' memory (a second call, e.g. a recomputation, alike)
            outs = tuple(c.view_as(c) for c in cast)
        else:
            outs, dst, srcs = _cast_outputs(sizes, weights, dtype)
            torch._foreach_copy_(dst, srcs)
        ctx.set_materialize_grads(False)
        ctx.sizes, ctx.rows = sizes, [w.shape[0] for w in weights]
        ctx.dtypes = [w.dtype for w in weights]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        src, dst, out, i = [], [], [], 0
        for n, g in zip(ctx.sizes, grads):
            rows = ctx.rows[i : i + n]
            if g is None:
                out.extend([None] * n)
            else:
                for part, dt in zip(g.split(rows), ctx.dtypes[i : i + n]):
                    src.append(part)
                    dst.append(part.new_empty(part.shape, dtype=dt))
                    out.append(dst[-1])
            i += n
        if dst:
            torch._foreach_copy_(dst, src)
        return (None, None, None, *out)


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
    """``tuple(torch.cat([w.to(dtype) for w in group]) for group in groups)``: the weights of each group (one
    dtype and width per group) stacked by rows, every group cast in one launch forward and one backward on a GPU
    (a sublayer's projections as one GEMM, and its other weights' casts under autocast, which would each be a
    launch both ways). ``cast``: those groups already cast (:func:`precast_weights`, one launch for the
    sublayers of a whole model); forward then launches nothing, backward still casts this call's gradients."""
    _check_groups(groups)
    sizes = tuple(len(g) for g in groups)
    if cast is not None and [(tuple(c.shape), c.dtype) for c in cast] != [
            ((sum(w.shape[0] for w in g), g[0].shape[1]), dtype) for g in groups]:
        raise ValueError(f"cast_weights: cast groups {[(tuple(c.shape), c.dtype) for c in cast]} do not match the "
                         f"weights' in {dtype}")
    return _CastWeights.apply(dtype, sizes, cast, *(w for g in groups for w in g))


def precast_weights(calls: list[list[list[Tensor]]], dtype: torch.dtype) -> list[tuple[Tensor, ...]]:
    """For several :func:`cast_weights` calls' groups, their casts all written by ONE multi-tensor copy, without
    gradient: pass each call its own as ``cast``. A model casts every sublayer's weights once a forward this way
    (one launch instead of one per sublayer), while each sublayer's backward still casts its own gradients as they
    arrive (no gradient waits for the others')."""
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
