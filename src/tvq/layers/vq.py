"""Vector quantization of attention keys with EMA codebooks (docs/spec.md section 2)."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tvq.layers.host_flags import HostFlags
from tvq.ops.cache import code_statistics
from tvq.ops.kernels import graph_capturing, kernels_enabled


_RECOMPUTING = contextvars.ContextVar("tvq_recomputing", default=False)
_CHECKPOINTED = contextvars.ContextVar("tvq_checkpointed", default=False)


@contextlib.contextmanager
def checkpointed():
    """Marks activation checkpointing's first run of a forward: its keys are not kept for backward, so the codebook
    statistics sum them per code at once rather than keep them to the end of the model's forward
    (:func:`add_statistics`)."""
    token = _CHECKPOINTED.set(True)
    try:
        yield
    finally:
        _CHECKPOINTED.reset(token)


@contextlib.contextmanager
def recomputing():
    """Marks activation checkpointing's second run of a forward: its codebook statistics were
    gathered by the first run and are not gathered again."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


@dataclass
class Quantized:
    keys: Tensor    # (B, H, T, D_k) quantized keys; straight-through: gradient flows to the input keys
    codes: Tensor   # (B, H, T) long, the assigned code of each key
    commit: Tensor  # () mean over tokens of sum over heads ||k - sg(c_z)||^2
    codebook: Tensor  # (H, S, D_k) the codewords the keys were quantized against, in the parameters' dtype


class CodebookMetrics(Mapping):
    """Codebook health metrics (name -> float), computed and read from the device only when first looked
    at: a training step that does not log them neither launches their kernels nor waits for the device;
    the first read is one transfer for all of them. ``compute`` returns them as one (len(names),) tensor."""

    def __init__(self, names: tuple[str, ...], compute: Callable[[], Tensor]):
        self.names, self._compute = names, compute
        self._floats: dict[str, float] | None = None

    @classmethod
    def mean(cls, metrics: list["CodebookMetrics"]) -> "CodebookMetrics":
        """The mean over sublayers (all with the same names)."""
        return cls(metrics[0].names, lambda: torch.stack([m.values() for m in metrics]).mean(0))

    def values(self) -> Tensor:
        """The metrics as one tensor (len(names),), on the device."""
        return self._compute()

    def _read(self) -> dict[str, float]:
        if self._floats is None:
            self._floats = dict(zip(self.names, self.values().tolist()))
        return self._floats

    def __getitem__(self, name: str) -> float:
        return self._read()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"CodebookMetrics({self._read()})"


class VectorQuantizer(HostFlags):
    """Per-head codebooks kept as EMA sums and counts; never trained by gradient.

    In training mode every forward adds its assignment statistics to an accumulator;
    :meth:`apply_update` folds them into the EMA buffers. Calling it once per optimizer step
    makes gradient accumulation (and data-parallel ranks, through the ``all_reduce`` hook)
    give exactly the update of one big batch. The accumulator is a non-persistent buffer
    (``_stats``: not saved, follows the codebook's device and dtype, at a fixed address so that a
    compiled step can be captured in a CUDA graph; tvq's DDP does not sync buffers in forward).
    Neither a forward nor an update reads anything back to the host: flags that control Python
    branches (k-means pending, the update count) have host copies, read again only when their buffers
    change under them (a load).
    """

    # layout of the flat statistics vector: [sums (H*S*D_k) | counts (H*S)] then 2 scalars (the tokens are any
    # head's count summed: every valid token has one code per head)
    _N_SCALARS = 2  # total squared quantization error, total squared key norm

    KMEANS_ITERS = 5  # k-means: 2-means iterations per split, and Lloyd iterations over all keys at the end
    KMEANS_KEYS_PER_CODE = 64  # k-means keeps at most this many keys per code and head (per rank)

    def __init__(self, n_head: int, n_code: int, d_k: int, decay: float, init: str = "random",
                 revive: float = 0.0):
        super().__init__()
        self.n_head, self.n_code, self.d_k, self.decay = n_head, n_code, d_k, decay
        # the official code's init: its dense-kernel initializer (fan-in normal) on shape (H, S, D_k),
        # std (H S)^-1/2; with c_count = 1 these are the initial codewords
        self.register_buffer("c_sum", torch.randn(n_head, n_code, d_k) * (n_head * n_code) ** -0.5)  # (H, S, D_k)
        self.register_buffer("c_count", torch.ones(n_head, n_code))  # (H, S)
        self.register_buffer("_stats", torch.zeros(self.stats_numel), persistent=False)  # the accumulator
        self.init, self.revive = init, revive
        # per forward, what is not yet in _stats (add_statistics adds it)
        self._unadded: list[_Unadded] = []
        self._codebooks: dict[torch.dtype, Tensor] = {}  # codebook()'s results, valid for _codebook_key
        self._codebook_key: tuple | None = None
        if init == "kmeans":  # True until the first update has run k-means (saved: a resumed run skips it)
            self.register_buffer("kmeans_pending", torch.tensor(True))
            self._set_host("kmeans_pending", True)
            self._init_keys: list[tuple[Tensor, Tensor | None]] = []  # per forward: keys (H, N, D_k), mask (N,)
        elif init != "random":
            raise ValueError(f"codebook init must be 'random' or 'kmeans', got {init!r}")
        if revive > 0:  # updates so far: seeds the revival offsets, the same on every rank (saved)
            self.register_buffer("n_updates", torch.tensor(0))
            self._set_host("n_updates", 0)

    @property
    def _kmeans_pending(self) -> bool:
        return self.init == "kmeans" and self._host("kmeans_pending", bool)

    def codebook(self, dtype: torch.dtype | None = None) -> Tensor:
        """The codewords C = c_sum / max(c_count, 0.01) -> (H, S, D_k), in ``dtype`` (default the buffers').

        Kept between calls (per dtype) until either buffer is replaced or written (told by its identity and
        version, as :class:`tvq.layers.host_flags.HostFlags` tells its flags): the codebook changes once per optimizer
        step, so a forward neither divides nor casts it again (on a GPU three launches per sublayer and step).
        Computed afresh inside torch.compile, while a CUDA graph is captured (its replays must divide the buffers as
        they then are), under inference mode (whose tensors autograd could not save later) and when a buffer
        requires grad.
        Callers must not write the result in place."""
        dtype = dtype or self.c_sum.dtype
        if (torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or self.c_sum.requires_grad
                or self.c_count.requires_grad or graph_capturing(self.c_sum)):  # a graph's own: not kept across steps
            return _codewords(self.c_sum, self.c_count).to(dtype)
        if self._codebook_key != self._buffers_key():
            self._codebooks = {self.c_sum.dtype: _codewords(self.c_sum, self.c_count)}
            self._codebook_key = self._buffers_key()
        if dtype not in self._codebooks:
            self._codebooks[dtype] = self._codebooks[self.c_sum.dtype].to(dtype)
        return self._codebooks[dtype]

    def _buffers_key(self) -> tuple:
        """c_sum's and c_count's identity and version: what :meth:`codebook`'s kept results were computed from."""
        return id(self.c_sum), self.c_sum._version, id(self.c_count), self.c_count._version

    @property
    def stats_numel(self) -> int:
        return self.n_head * self.n_code * (self.d_k + 1) + self._N_SCALARS

    def forward(self, k: Tensor, token_mask: Tensor | None = None) -> Quantized:
        """Quantize keys k (B, H, T, D_k); token_mask (B, T) bool excludes padding from stats."""
        c_full = self.codebook()  # (H, S, D_k), in the parameters' dtype
        # argmin_s ||k - c_s||^2 = argmin_s (||c_s||^2 - 2 k.c_s), in at least fp32 (under autocast too) so the
        # codes are the fp32 argmin: on the Triton path one kernel (no (T, S) distances in memory) that also writes
        # the straight-through key, the error and the key norms (and one kernel in backward), else one fused
        # product per (b, h) and an argmin
        dd = torch.promote_types(torch.promote_types(k.dtype, c_full.dtype), torch.float32)
        k_sq = commit = None  # (B, T) ||k||^2 summed over heads and the loss (), where the kernel wrote them
        if dd == torch.float32 and kernels_enabled(k):
            from tvq.ops.kernels.vq_codes import quantize_kernel

            # (B, H, T, D_k), (B, H, T), float32 (B, H, T) x 2, and without a mask the commitment loss ()
            k_st, codes, err, k_sq, commit = quantize_kernel(k, c_full, mean=token_mask is None)
            # (B, T), summed over heads (one head: a view, and a view in backward: no kernel)
            err, k_sq = (err.squeeze(1), k_sq.squeeze(1)) if self.n_head == 1 else (err.sum(1), k_sq.sum(1))
        else:
            with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
                B, H, T, K = k.shape
                cb = c_full.to(dd).expand(B, H, -1, K).reshape(B * H, -1, K)  # (B H, S, D_k)
                dist = torch.baddbmm(cb.square().sum(-1, keepdim=True).transpose(1, 2),
                                     k.to(dd).reshape(B * H, T, K), cb.transpose(1, 2), alpha=-2)  # (B H, T, S)
                codes = dist.argmin(-1).view(B, H, T)
            heads = torch.arange(self.n_head, device=k.device)[None, :, None]  # (1, H, 1)
            c_z = c_full.to(k.dtype)[heads, codes]  # (B, H, T, D_k)
            k_st = c_z + (k - k.detach()) if k.requires_grad else c_z  # straight-through estimator
            err = (k - c_z).square().sum(-1).sum(1)  # (B, T), summed over heads
        if token_mask is None:
            commit = err.mean() if commit is None else commit
        else:
            w = token_mask.to(err.dtype)
            commit = (err * w).sum() / w.sum().clamp_min(1.0)
        # a compiled graph recomputes inside itself, never through here (and dynamo cannot read a ContextVar)
        if self.training and (torch.compiler.is_compiling() or not _RECOMPUTING.get()):
            self._accumulate(k.detach(), codes, err.detach(), token_mask, k_sq)
            if self._kmeans_pending:
                self._keep_keys(k.detach(), token_mask)
        return Quantized(k_st, codes, commit, c_full)

    def _keep_keys(self, k: Tensor, token_mask: Tensor | None) -> None:
        """Keep (up to a cap of slots, padding included: shapes stay static) the keys k (B, H, T, D_k) of
        this step's forwards for k-means, with their token mask; padding is dropped at the update."""
        room = self.KMEANS_KEYS_PER_CODE * self.n_code - sum(x.shape[1] for x, _ in self._init_keys)
        keys = k.transpose(0, 1).flatten(1, 2)  # (H, B T, D_k)
        mask = None if token_mask is None else token_mask.flatten()[:room]  # (B T,)
        if room > 0 and keys.shape[1]:
            self._init_keys.append((keys[:, :room].to(self.c_sum.dtype), mask))

    @torch.no_grad()
    def _accumulate(self, k: Tensor, codes: Tensor, err: Tensor, token_mask: Tensor | None,
                    k_sq: Tensor | None = None) -> None:
        """Keep this forward's keys and codes and its per-token squared errors and key norms (err and k_sq (B, T),
        summed over heads; k_sq computed from k when None) for the accumulator: :func:`add_statistics` sums the keys
        per code and adds everything, for every sublayer in one batch, at the end of the model's forward or when
        they are read (the keys are kept for backward anyway; under activation checkpointing, where they are not,
        they are summed here)."""
        acc_dtype = self.c_sum.dtype
        if k_sq is None:
            k_sq = k.to(acc_dtype).square().sum((1, 3))  # (B, T)
        err, k_sq = err.to(acc_dtype), k_sq.to(acc_dtype)
        if token_mask is not None:
            w = token_mask.to(acc_dtype)  # (B, T)
            err, k_sq = err * w, k_sq * w
        # (dynamo cannot read a ContextVar: a compiled graph keeps the keys to the end of its forward)
        now = not torch.compiler.is_compiling() and _CHECKPOINTED.get()
        sums = _code_sums([(k, codes)], token_mask, self.n_code, acc_dtype)[0] if now else None
        self._unadded.append(_Unadded(sums, k, codes, token_mask, err, k_sq))

    def pending_stats(self) -> Tensor:
        """The statistics accumulated since the last update, as one flat vector (zeros if none)."""
        add_statistics([self])
        return self._stats

    def clear_stats(self) -> None:
        """Forget the statistics gathered since the last update (and the keys kept for k-means)."""
        self._unadded = []
        self._stats.zero_()
        if self.init == "kmeans":
            self._init_keys = []

    @torch.no_grad()
    def apply_update(self, stats: Tensor | None = None,
                     all_reduce: Callable[[Tensor], object] | None = None) -> CodebookMetrics:
        """EMA step c <- decay * c + (1 - decay) * stats, then clear the accumulator.

        ``stats`` defaults to :meth:`pending_stats`; pass an all-reduced copy for data-parallel
        training. Returns codebook health metrics of the statistics just applied (read lazily: the update
        itself never waits for the device, except k-means, once).

        Tools not in the paper (off by default): with ``init="kmeans"`` the first update replaces the
        codebook by k-means over that step's keys instead (``all_reduce`` then sums its statistics
        across ranks); with ``revive > 0`` codes whose EMA count falls below it are re-seeded after
        each update (``metrics["revived"]``: the fraction of codes).
        """
        stats = (self.pending_stats() if stats is None else stats).clone()  # the accumulator is cleared next
        return apply_updates([self], [stats], all_reduce)

    def _split_stats(self, stats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views of a flat statistics vector: k_sum (H, S, D_k), count (H, S), and err, norm (0-dim)."""
        H, S, K = self.n_head, self.n_code, self.d_k
        err, norm = stats[H * S * (K + 1):].unbind()
        return stats[: H * S * K].view(H, S, K), stats[H * S * K: H * S * (K + 1)].view(H, S), err, norm

    # ------------------------------------------------------------ codebook tools (not in the paper)
    def _offsets(self, seed: int, shape, scale: Tensor) -> Tensor:
        """Random offsets (..., D_k) of RMS ``scale`` (...,) per row, from a host generator seeded with
        ``seed``: the same on every rank (drawn on the host and copied over: no read-back)."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(*shape, self.d_k, generator=g, dtype=torch.float64).to(self.c_sum)
        return z * (scale.to(z.dtype)[..., None] / math.sqrt(self.d_k))

    def _revive(self, k_sum: Tensor, count: Tensor, mse: Tensor) -> Tensor:
        """Re-seed the codes whose EMA count fell below ``revive``: each takes half of one of the codes
        this step's keys used most among those with an EMA count of at least twice ``revive`` (most
        used first; one dead code per such code and step; dead codes in index order), both halves placed
        at the mean of that code's keys this step, one plus and one minus a random offset of half the RMS
        quantization error (a split of a busy code, as in LBG codebook design). Everything comes from the
        (all-reduced) statistics of the step and a generator seeded with the update count, so every
        rank revives the same codes identically. All heads at once, in fixed shapes: no read-back.
        Returns the fraction of codes revived (a 0-dim tensor)."""
        H, S = self.n_head, self.n_code
        n_updates = self._host("n_updates", int) + 1
        self.n_updates += 1
        self._set_host("n_updates", n_updates)
        dead = self.c_count < self.revive  # (H, S)
        order = count.argsort(dim=-1, descending=True, stable=True)  # (H, S) most used first
        # (H, S) in that order: codes whose halves both stay live
        donor = ((count > 0) & (self.c_count >= 2 * self.revive)).gather(1, order)
        n_pairs = torch.minimum(donor.sum(-1), dead.sum(-1))  # (H,)
        # pair r of head h: donor donors[h, r] and target targets[h, r] for r < n_pairs[h]; S: no pair
        spare = torch.full((H, S + 1), S, dtype=torch.long, device=count.device)
        donors = spare.scatter(1, torch.where(donor, donor.long().cumsum(-1) - 1, S), order)[:, :S]  # (H, S)
        codes = torch.arange(S, device=count.device).expand(H, S)
        targets = spare.scatter(1, torch.where(dead, dead.long().cumsum(-1) - 1, S), codes)[:, :S]  # (H, S)
        paired = codes < n_pairs[:, None]  # (H, S)
        donors, targets = torch.where(paired, donors, S), torch.where(paired, targets, S)
        # on copies with a spare code S that absorbs the unpaired rows
        c_count = torch.cat([self.c_count, self.c_count.new_zeros(H, 1)], 1)  # (H, S + 1)
        c_sum = torch.cat([self.c_sum, self.c_sum.new_zeros(H, 1, self.d_k)], 1)  # (H, S + 1, D_k)
        heads = torch.arange(H, device=count.device)[:, None]  # (H, 1)
        d = donors.clamp_max(S - 1)
        mean = k_sum[heads, d] / count[heads, d].clamp_min(1.0)[..., None]  # (H, S, D_k)
        delta = self._offsets(n_updates, (H, S), (0.5 * mse.sqrt()).expand(H, S))  # (H, S, D_k)
        half = c_count[heads, donors] / 2  # (H, S)
        c_count[heads, donors] = half
        c_count[heads, targets] = half
        c_sum[heads, donors] = (mean - delta) * half[..., None]
        c_sum[heads, targets] = (mean + delta) * half[..., None]
        self.c_count.copy_(c_count[:, :S])
        self.c_sum.copy_(c_sum[:, :S])
        return n_pairs.sum() / (H * S)

    def _kmeans_init(self, all_reduce: Callable[[Tensor], object] | None) -> None:
        """Codebooks by k-means over the keys kept from this step's forwards: bisecting k-means (start
        from one cluster; ``n_code - 1`` times split the cluster of largest total squared error in two
        with ``KMEANS_ITERS`` 2-means iterations over its keys, started at its mean plus and minus a
        random offset of half its RMS radius), then ``KMEANS_ITERS`` Lloyd iterations over all keys.
        Each iteration all-reduces its sums, counts and squared errors and the offsets come from fixed
        seeds, so every rank builds the same codebook from the global batch. Afterwards c_sum / c_count
        hold the clusters' sums and counts (count >= 1), as if the EMA had settled on them."""
        H, S, K = self.n_head, self.n_code, self.d_k
        kept = [keys if mask is None else keys[:, mask] for keys, mask in self._init_keys]  # padding dropped
        keys = torch.cat(kept, 1) if kept else self.c_sum.new_zeros(H, 0, K)  # (H, N, D_k)
        self._init_keys = []
        heads = torch.arange(H, device=keys.device)
        codes = keys.new_zeros(keys.shape[:2], dtype=torch.long)  # (H, N) every key in cluster 0
        sums, counts, sq = self._lloyd_stats(keys, codes, 1, all_reduce)
        cent = sums / counts.clamp_min(1.0)[..., None]  # (H, n, D_k)
        for n in range(1, S):  # split cluster j of each head into j and n
            j = sq.argmax(-1)  # (H,)
            radius = (sq[heads, j] / counts[heads, j].clamp_min(1.0)).sqrt()  # (H,)
            delta = self._offsets(n, (H,), 0.5 * radius)  # (H, D_k)
            pair = torch.stack([cent[heads, j] - delta, cent[heads, j] + delta], 1)  # (H, 2, D_k)
            member = codes == j[:, None]  # (H, N)
            for _ in range(self.KMEANS_ITERS):
                side = torch.cdist(keys, pair).argmin(-1)  # (H, N) 0: stays in j, 1: goes to n
                p_sums, p_counts, p_sq = self._lloyd_stats(keys, torch.where(member, side, 2), 3, all_reduce)
                pair = torch.where(p_counts[:, :2, None] > 0, p_sums[:, :2] / p_counts[:, :2, None].clamp_min(1.0), pair)
            codes = torch.where(member & (side == 1), n, codes)
            cent = torch.cat([cent, pair[:, 1:]], 1)
            cent[heads, j] = pair[:, 0]
            sums = torch.cat([sums, p_sums[:, 1:2]], 1)
            counts = torch.cat([counts, p_counts[:, 1:2]], 1)
            sq = torch.cat([sq, p_sq[:, 1:2]], 1)
            counts[heads, j], sq[heads, j] = p_counts[:, 0], p_sq[:, 0]
        for _ in range(self.KMEANS_ITERS + 1):  # Lloyd over all keys (the last pass only counts)
            codes = torch.cdist(keys, cent).argmin(-1) if keys.shape[1] else codes
            sums, counts, _ = self._lloyd_stats(keys, codes, S, all_reduce)
            cent = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], cent)
        self.c_count.copy_(counts.clamp_min(1.0))
        self.c_sum.copy_(cent * self.c_count[..., None])
        self.kmeans_pending.fill_(False)
        self._set_host("kmeans_pending", False)

    def _lloyd_stats(self, keys: Tensor, codes: Tensor, n: int, all_reduce) -> tuple[Tensor, Tensor, Tensor]:
        """Per-cluster statistics of keys (H, N, D_k) in clusters ``codes`` (H, N) in [0, n), summed over
        ranks: key sums (H, n, D_k), counts (H, n) and squared distances to the cluster means (H, n)."""
        H, K = keys.shape[0], keys.shape[2]
        # the second moment gives each cluster's squared error once the sums are global
        counts, sums = code_statistics(codes, torch.cat([keys, keys.square().sum(-1, keepdim=True)], -1), None, n,
                                       keys.dtype)  # (H, n), (H, n, D_k + 1)
        flat = torch.cat([sums[..., :K].flatten(), counts.flatten(), sums[..., K].flatten()])
        if all_reduce is not None:
            all_reduce(flat)
        sums, counts = flat[: H * n * K].view(H, n, K), flat[H * n * K: H * n * (K + 1)].view(H, n)
        second = flat[H * n * (K + 1):].view(H, n)
        sq = (second - sums.square().sum(-1) / counts.clamp_min(1.0)).clamp_min(0.0)  # sum ||k - mean||^2
        return sums, counts, sq

    def _metrics(self, count: Tensor, err: Tensor, norm: Tensor, dead: Tensor) -> CodebookMetrics:
        """Health of the statistics just applied (count (H, S), err, norm 0-dim: views of a copy
        of them) and of the EMA counts now (``dead``: the fraction with EMA count < 1, computed now: later updates
        change the counts)."""
        S = self.n_code

        def compute() -> Tensor:
            p = count / count.sum(-1, keepdim=True).clamp_min(1e-12)  # (H, S)
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()  # nats, mean over heads
            return torch.stack([
                (count > 0).to(count.dtype).mean(),  # usage: fraction of codes hit this step
                dead,
                entropy / math.log(S) if S > 1 else torch.ones_like(entropy),
                torch.where(norm > 0, (err / norm.clamp_min(1e-30)).sqrt(), 0.0),  # rel_err: ||k - k_hat|| / ||k||
                count[0].sum(),  # tokens: every valid token has one code per head
            ])
        return CodebookMetrics(("usage", "dead", "entropy", "rel_err", "tokens"), compute)


def _dead_fractions(quantizers: list[VectorQuantizer]) -> list[Tensor]:
    """Each quantizer's fraction of codes with EMA count < 1 (0-dim), in one pass when all have one shape."""
    counts = [q.c_count for q in quantizers]
    if len({c.shape for c in counts}) == 1:
        return list((torch.stack(counts) < 1.0).to(counts[0].dtype).mean((1, 2)).unbind())  # (n,) -> n x ()
    return [(c < 1.0).to(c.dtype).mean() for c in counts]


@dataclass
class _Unadded:
    """One forward's statistics not yet in the accumulator: the per-code key sums (k_sum (H, S, D_k), count (H, S))
    or None (not summed yet: the keys (B, H, T, D_k) and codes (B, H, T) with the token mask (B, T) or None), and
    the per-token errors and key norms (B, T) in the accumulator's dtype."""
    sums: tuple[Tensor, Tensor] | None
    k: Tensor
    codes: Tensor
    token_mask: Tensor | None
    err: Tensor
    k_sq: Tensor


def _code_sums(keys: list[tuple[Tensor, Tensor]], token_mask: Tensor | None, n_code: int,
               dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """(k_sum (H, S, D_k), count (H, S)) of each (keys (B, H, T, D_k), codes (B, H, T)) pair, all of one shape and
    one token mask, summed in one call: the pairs' heads stacked as rows (one launch of the per-code sums on the
    Triton path, where one per forward would be one each, two with their chunked walk)."""
    def stacked(ts):  # (G, ...): no copy for one
        return ts[0][None] if len(ts) == 1 else torch.stack(ts)

    ks = stacked([k for k, _ in keys]).transpose(1, 2)  # (G, H, B, T, D_k)
    cs = stacked([c for _, c in keys]).transpose(1, 2)  # (G, H, B, T)
    G, H = cs.shape[:2]
    valid = None if token_mask is None else token_mask.flatten()  # (B T,)
    count, k_sum = code_statistics(cs.flatten(2).flatten(0, 1), ks.flatten(2, 3).flatten(0, 1), valid, n_code,
                                   dtype)  # (G H, S), (G H, S, D_k)
    return list(zip(k_sum.view(G, H, *k_sum.shape[1:]).unbind(), count.view(G, H, -1).unbind()))


@torch.no_grad()
def add_statistics(quantizers: list[VectorQuantizer]) -> None:
    """Add the statistics the quantizers' forwards kept (:meth:`VectorQuantizer._accumulate`) to their accumulators:
    the keys of every forward of one shape and token mask summed per code in one call, the per-token errors and norms
    in one reduction, then one multi-tensor add for everything (a few launches for all sublayers on a GPU, where one
    quantizer at a time takes five)."""
    items = [(q, entry) for q in quantizers for entry in q._unadded]
    if not items:
        return
    groups: dict[tuple, list[_Unadded]] = {}
    for q, e in items:
        if e.sums is None:
            key = (e.k.shape, e.k.dtype, e.k.device, id(e.token_mask), q.n_code, q.c_sum.dtype)
            groups.setdefault(key, []).append(e)
    for (*_, n_code, dtype), entries in groups.items():
        for e, sums in zip(entries, _code_sums([(e.k, e.codes) for e in entries], entries[0].token_mask, n_code,
                                               dtype)):
            e.sums = sums
    per_token = [t for _, e in items for t in (e.err, e.k_sq)]
    if len({(t.shape, t.dtype) for t in per_token}) == 1:
        sums = torch.stack(per_token).flatten(1).sum(1).unbind()  # (2 n,): err and k_sq of each forward
    else:  # forwards of different lengths (segments)
        sums = [t.sum() for t in per_token]
    accs, adds = [], []
    for i, (q, e) in enumerate(items):
        accs += q._split_stats(q._stats)
        adds += [*e.sums, sums[2 * i], sums[2 * i + 1]]
    for q in quantizers:
        q._unadded = []
    torch._foreach_add_(accs, adds)


@torch.no_grad()
def apply_updates(quantizers: list[VectorQuantizer], stats: list[Tensor],
                  all_reduce: Callable[[Tensor], object] | None = None) -> CodebookMetrics:
    """:meth:`VectorQuantizer.apply_update` of several quantizers (a model's sublayers) with their flat ``stats``
    (copies, not the accumulators, which are cleared here); returns the mean of their metrics.

    The EMA steps of all of them run as multi-tensor ops (``torch._foreach_*``: on a GPU one launch per op for every
    sublayer together, where one op per buffer costs about nine launches per sublayer), with the same arithmetic
    as one quantizer's: c <- c * decay, then c += (1 - decay) * stats."""
    for q in quantizers:  # cleared with the accumulator, as if added (``stats`` are copies taken before)
        q._unadded = []
    torch._foreach_zero_([q._stats for q in quantizers])
    parts = [q._split_stats(st) for q, st in zip(quantizers, stats)]
    ema = [i for i, q in enumerate(quantizers) if not q._kmeans_pending]
    for i in (i for i in range(len(quantizers)) if i not in ema):  # k-means replaces the first update
        quantizers[i]._kmeans_init(all_reduce)
    by_decay: dict[float, list[int]] = {}
    for i in ema:
        by_decay.setdefault(quantizers[i].decay, []).append(i)
    for decay, idx in by_decay.items():
        bufs = [quantizers[i].c_sum for i in idx] + [quantizers[i].c_count for i in idx]
        new = [parts[i][0] for i in idx] + [parts[i][1] for i in idx]
        torch._foreach_mul_(bufs, decay)
        torch._foreach_add_(bufs, new, alpha=1 - decay)
    dead = _dead_fractions(quantizers)
    metrics = []
    for i, q in enumerate(quantizers):
        k_sum, count, err, norm = parts[i]
        m = q._metrics(count, err, norm, dead[i])
        if i in ema and q.revive > 0:
            revived = q._revive(k_sum, count, err / count.sum().clamp_min(1.0))  # per token and head
            m = CodebookMetrics(m.names + ("revived",), lambda m=m, r=revived: torch.cat([m.values(), r[None]]))
        metrics.append(m)
    _refresh_codebooks(quantizers)
    return metrics[0] if len(metrics) == 1 else CodebookMetrics.mean(metrics)


def _codewords(c_sum: Tensor, c_count: Tensor) -> Tensor:
    """C = c_sum / max(c_count, 0.01): (..., S, D_k) from (..., S, D_k) and (..., S)."""
    return c_sum / c_count.clamp_min(0.01)[..., None]


@torch.no_grad()
def _refresh_codebooks(quantizers: list[VectorQuantizer]) -> None:
    """Compute the new codebooks of quantizers of one shape in one batch (a stack of the buffers, one division, one
    cast per dtype the forwards asked for: five launches a step, where a forward would take three per sublayer) and
    keep them as :meth:`VectorQuantizer.codebook`'s results."""
    if torch.compiler.is_compiling() or any(graph_capturing(q.c_sum) for q in quantizers[:1]):
        return
    groups: dict[tuple, list[VectorQuantizer]] = {}
    for q in quantizers:
        if not (q.c_sum.requires_grad or q.c_count.requires_grad or torch.is_inference_mode_enabled()):
            groups.setdefault((q.c_sum.shape, q.c_sum.dtype, q.c_sum.device, q.c_count.dtype), []).append(q)
    for group in groups.values():
        c_sum = torch.stack([q.c_sum for q in group])  # (n, H, S, D_k)
        c_count = torch.stack([q.c_count for q in group])  # (n, H, S)
        books = {c_sum.dtype: _codewords(c_sum, c_count)}  # (n, H, S, D_k)
        for dtype in {dt for q in group for dt in q._codebooks} - {c_sum.dtype}:
            books[dtype] = books[c_sum.dtype].to(dtype)
        for i, q in enumerate(group):
            q._codebooks = {dt: book[i] for dt, book in books.items()}
            q._codebook_key = q._buffers_key()

