"""Adafactor for plain and FSDP2-sharded parameters.

:class:`Adafactor` is the algorithm of ``torch.optim.Adafactor`` (torch 2.13), same defaults and
same optimizer state (``step``, ``row_var``, ``col_var``, ``variance``), written so that it can
also step parameters that FSDP2 (``fully_shard``) has sharded into DTensors, which the torch
optimizer cannot. On such a parameter each rank works on its own rows (``to_local()``), and the
quantities that the algorithm takes over the whole tensor are summed over the ranks:

- RMS(param) and RMS(update): sums of squares over all shards, divided by the global numel;
- for a 2-D parameter, whose sharded dim 0 is the row dim: the column statistics (a mean over
  rows) and the normaliser (the mean of the row statistics).

A parameter of 3 or more dims is a batch of matrices over its last two dims, and FSDP2 shards
its dim 0, the batch dim, so its row and column statistics stay local. All sums of one step go
into one all-reduce per device mesh, and the sums of squares of the updates into a second; the
updates of sharded parameters are computed twice (before and after that second all-reduce)
rather than held, so memory stays at one update at a time. Shards may be uneven or empty: means
divide by global sizes.

The state of a sharded parameter is made of DTensors on the parameter's mesh: ``variance`` and
``row_var`` (and ``col_var`` of a parameter of 3 or more dims) sharded on dim 0 like the
parameter, the ``col_var`` of a 2-D parameter replicated. The state dict helpers of
``torch.distributed.checkpoint`` therefore gather the full state and re-shard it for any number
of ranks, and the full state is the state of ``torch.optim.Adafactor`` on the full tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard


def _mesh_of(p: Tensor) -> DeviceMesh | None:
    """The 1-D device mesh over which FSDP2 shards ``p`` on dim 0; None for a plain tensor.

    Raises ``ValueError`` for a DTensor laid out any other way."""
    if not isinstance(p, DTensor):
        return None
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard \
            or placements[0].dim != 0 or p.dim() == 0:
        raise ValueError(f"Adafactor steps plain tensors and DTensors sharded with placements (Shard(dim=0),) on a "
                         f"1-D device mesh (FSDP2); got a parameter of shape {tuple(p.shape)} with placements "
                         f"{placements} on a {p.device_mesh.ndim}-D mesh")
    return p.device_mesh


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _zeros(p: Tensor, shape: tuple[int, ...], sharded: bool) -> Tensor:
    """Zeros of global ``shape`` for the state of ``p``: a plain tensor for a plain ``p``; for a
    sharded ``p``, a DTensor on its mesh, sharded on dim 0 as ``p`` is when ``sharded`` (``shape[0]``
    is then ``p.shape[0]``), replicated otherwise."""
    if not isinstance(p, DTensor):
        return torch.zeros(shape, dtype=p.dtype, device=p.device)
    local_p = p.to_local()
    local_shape = (local_p.shape[0], *shape[1:]) if sharded else shape
    local = torch.zeros(local_shape, dtype=p.dtype, device=local_p.device)
    return DTensor.from_local(local, p.device_mesh, [Shard(0) if sharded else Replicate()], run_check=False,
                              shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())


def _sum_over_ranks(tensors: list[Tensor], mesh: DeviceMesh | None) -> list[Tensor]:
    """``tensors`` summed elementwise over the ranks of ``mesh`` with one all-reduce (as they are
    when ``mesh`` is None)."""
    if mesh is None or not tensors:
        return tensors
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])  # [total numel]
    dist.all_reduce(flat, group=mesh.get_group())
    return [part.view(t.shape).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class _Item:
    """One parameter's step: its local tensors and state, and the step's scalars."""

    def __init__(self, p: Tensor, state: dict, group: dict, mesh: DeviceMesh | None):
        self.mesh = mesh
        self.param = _local(p)  # this rank's rows of p (all of p when not sharded)
        grad = _local(p.grad)
        self.grad = -grad if group["maximize"] else grad  # same shape as self.param
        self.numel = p.numel()  # global
        self.factored = p.dim() >= 2
        # the rows of a 2-D parameter are split over the ranks; those of a >2-D one are not (dim 0 is a batch dim)
        self.rows_sharded = mesh is not None and p.dim() == 2
        self.n_rows = p.shape[-2] if self.factored else 0  # global
        self.row_var = _local(state["row_var"]) if self.factored else None  # [..., rows, 1]
        self.col_var = _local(state["col_var"]) if self.factored else None  # [..., 1, cols]
        self.variance = None if self.factored else _local(state["variance"])  # like self.param
        self._check_state(p)
        eps1, self.eps2 = group["eps"]
        self.eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
        self.lr, self.d, self.weight_decay = float(group["lr"]), group["d"], group["weight_decay"]
        state["step"] += 1
        t = state["step"].item()
        self.beta2_weight = t ** group["beta2_decay"]  # 1 - beta2_t
        self.rho = min(self.lr, 1 / t**0.5)
        self.sums: list[Tensor] = []  # the partial sums to add over the ranks, then their totals
        self.normaliser: Tensor | None = None  # [..., 1, 1]: the mean of row_var over the rows

    def _check_state(self, p: Tensor) -> None:
        """The loaded state matches this rank's part of ``p`` (a full state loaded into a sharded
        optimizer without ``set_optimizer_state_dict`` would not)."""
        shape = tuple(self.param.shape)
        if self.factored:  # a 2-D parameter's col_var is whole on every rank: (1, cols)
            want = {"row_var": (shape[:-1] + (1,), self.row_var),
                    "col_var": (shape[:-2] + (1, shape[-1]), self.col_var)}
        else:
            want = {"variance": (shape, self.variance)}
        for name, (local_shape, t) in want.items():
            if tuple(t.shape) != local_shape:
                raise ValueError(f"Adafactor state {name!r} of shape {tuple(t.shape)} does not fit the parameter of "
                                 f"shape {tuple(p.shape)} ({local_shape} expected on this rank); load a sharded "
                                 f"optimizer's state with torch.distributed.checkpoint.state_dict")

    def partial_sums(self) -> None:
        """Update this rank's second-moment statistics and collect its partial sums: of the
        squares of the parameter and, when the rows are sharded, of the column and row statistics."""
        self.sums = [torch.linalg.vector_norm(self.param).square()]  # []
        if self.factored:
            n_cols = self.grad.shape[-1]
            row_mean = torch.linalg.vector_norm(self.grad, dim=-1, keepdim=True).square_().div_(n_cols)  # [..., r, 1]
            self.row_var.lerp_(row_mean, self.beta2_weight)
            self.sums.append(torch.linalg.vector_norm(self.grad, dim=-2, keepdim=True).square_())  # [..., 1, cols]
            self.sums.append(self.row_var.sum(dim=-2, keepdim=True))  # [..., 1, 1]
        else:
            self.variance.lerp_(self.grad.square(), self.beta2_weight)

    def finish_moments(self) -> None:
        """With the summed statistics: the column statistics, the normaliser and the step size."""
        param_sq = self.sums[0]
        self.alpha = torch.sqrt(param_sq / self.numel).clamp(min=self.eps2) * self.rho  # []
        if self.factored:
            col_sq, row_sum = self.sums[1], self.sums[2]
            self.col_var.lerp_(col_sq / self.n_rows, self.beta2_weight)
            self.normaliser = (row_sum / self.n_rows).clamp_(min=self.eps1)
        self.sums = []

    def update(self) -> Tensor:
        """The unclipped update of this rank's part of the parameter (same shape)."""
        if self.factored:
            var = (self.row_var @ self.col_var).div_(self.normaliser)  # [..., r, cols]
        else:
            var = self.variance.clone()
        return var.clamp_(min=self.eps1 * self.eps1).rsqrt_().mul_(self.grad)

    def apply(self, update: Tensor, update_sq: Tensor) -> None:
        """Weight decay, then the update clipped to RMS ``d`` (``update_sq``: its global sum of squares)."""
        denom = (torch.sqrt(update_sq / self.numel) / self.d).clamp(min=1.0)  # []
        if self.weight_decay != 0:
            self.param.mul_(1 - self.lr * self.weight_decay)
        self.param.sub_(update.mul_((self.alpha / denom).to(update.dtype)))


class Adafactor(torch.optim.Optimizer):
    """The algorithm and defaults of ``torch.optim.Adafactor`` (torch 2.13) for plain tensors and
    for FSDP2 parameters (DTensors sharded on dim 0 over a 1-D mesh); see the module docstring.

    ``lr`` caps the relative step size ``rho_t = min(lr, 1 / sqrt(t))`` and scales the decoupled
    weight decay; ``beta2_decay`` gives ``beta2_t = 1 - t ** beta2_decay``; ``eps = (eps1, eps2)``
    with ``eps1`` (None: the dtype's machine epsilon) bounding the second-moment estimates and
    ``eps2`` the parameter scale; ``d`` is the threshold for clipping the update's RMS.
    One difference, for groups that mix dtypes only: ``eps1 = None`` is the epsilon of each
    parameter's own dtype, where torch's takes that of the group's first parameter with a gradient.
    """

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
                 maximize: bool = False) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d, weight_decay=weight_decay,
                        maximize=maximize)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                _mesh_of(p)
        except ValueError:
            self.param_groups.pop()
            raise

    def _init_state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            # a float64 step under a float64 default dtype, as torch's optimizers keep it
            step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=step_dtype)
            shape = tuple(p.shape)
            if p.dim() >= 2:
                state["row_var"] = _zeros(p, shape[:-1] + (1,), sharded=True)
                state["col_var"] = _zeros(p, shape[:-2] + (1, shape[-1]), sharded=p.dim() > 2)
            else:
                state["variance"] = _zeros(p, shape, sharded=True)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One Adafactor step of every parameter that has a gradient. Under FSDP every rank of a
        parameter's mesh must call it (it all-reduces)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items: list[_Item] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Adafactor does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                mesh = _mesh_of(p)
                if mesh is not None and (not isinstance(p.grad, DTensor) or p.grad.placements != p.placements):
                    raise ValueError(f"the gradient of a parameter with placements {tuple(p.placements)} has "
                                     f"placements {getattr(p.grad, 'placements', 'none (a plain tensor)')}")
                items.append(_Item(p, self._init_state(p), group, mesh))
        # the meshes in parameter order, so that every rank issues the same all-reduces
        meshes = list(dict.fromkeys(item.mesh for item in items if item.mesh is not None))

        for item in items:
            item.partial_sums()
        for mesh in meshes:
            # the row statistics of a >2-D parameter are per batch index, so only the sums over
            # sharded rows (and the squares of every sharded parameter) go over the ranks
            mine = [item for item in items if item.mesh == mesh]
            parts = [t for item in mine for t in (item.sums if item.rows_sharded else item.sums[:1])]
            totals = iter(_sum_over_ranks(parts, mesh))
            for item in mine:
                n = len(item.sums) if item.rows_sharded else 1
                item.sums[:n] = [next(totals) for _ in range(n)]
        for item in items:
            item.finish_moments()

        sharded = []
        for item in items:
            update = item.update()
            update_sq = torch.linalg.vector_norm(update).square()
            if item.mesh is None:
                item.apply(update, update_sq)
            else:  # applied once RMS(update) is summed over the ranks; recomputed rather than held
                sharded.append((item, update_sq))
            del update
        for mesh in meshes:
            mine = [(item, sq) for item, sq in sharded if item.mesh == mesh]
            totals = _sum_over_ranks([sq for _, sq in mine], mesh)
            for (item, _), update_sq in zip(mine, totals):
                item.apply(item.update(), update_sq)
        return loss
