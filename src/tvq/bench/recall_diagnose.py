"""``tvq recall --diagnose``: why an answer is (not) recalled, per answer and per attention unit.

For each answer (query at position i, written VALUE at w = i - d) and each attention unit (a GAU, or a
head of an mha/mqa sublayer), from the unit's own q, keys and values recomputed on the held-out rows:

- ``attn_target``: the softmax weight of the query on position w; ``attn_window`` / ``attn_far``: on the
  window / on every key older than it (the cache; 0 without ``agg_cache``);
- for answers beyond the window (d > mem_len), where w is in the cache: ``group``, the number of keys
  older than the window with w's code (w included: one cache entry), ``other_values``, how many of them
  are other VALUE positions (written pairs, their queries, distractors), ``rival_values``, how many of
  those hold another value than w (the collisions that mix a wrong value into the entry), ``attn_code``, the weight on that cache entry, and ``cos_mean``, the cosine between the entry's value
  (the group's mean) and w's own value: how the mean dilutes the value (w itself weighs
  attn_code / group in the output), against ``cos_all``, the cosine with the mean value of every key
  older than the window (what a cache of one entry would return).

Accuracy is then conditioned on these (collided: a rival in the entry, or clean; group size, weight on
the right code, cosine).
Dense attention (``full``) has no codes: only ``attn_target``, ``attn_window`` and ``attn_far``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tvq.layers.attention import per_query_head
from tvq.models.transformer_vq import IGNORE_INDEX, TransformerVQ

BINS = {
    "group": [1, 2, 5, 17, 65, math.inf],  # [lo, next lo)
    "other_values": [0, 1, 2, 4, math.inf],
    "rival_values": [0, 1, 2, 4, math.inf],
    "attn_code": [0.0, 0.05, 0.2, 0.5, math.inf],
    "attn_target": [0.0, 0.05, 0.2, 0.5, math.inf],
    "cos_mean": [-math.inf, 0.5, 0.8, 0.95, math.inf],
}


@torch.no_grad()
def answer_probs(q: Tensor, keys: Tensor, *, rel: Tensor, u: Tensor, v: Tensor, mem_len: int, agg_cache: bool,
                 cache_bias: Tensor | None, query_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The attention weights of the queries at ``query_pos`` (B, P) over every key, by docs/spec.md
    section 3 (each key older than the window scored alone: keys of one code score alike, so their
    weights sum to the cache entry's). q, keys (B, H, T, D_k) (keys quantized for vq), rel (H, M + 1, D_k),
    u, v (H, D_k), cache_bias (H,) or None. -> probs (B, H, P, T) (at least float32), and the window and
    older-key masks (B, 1, P, T)."""
    B, H, T, Dk = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    qa = q.gather(2, query_pos[:, None, :, None].expand(-1, H, -1, Dk))  # (B, H, P, D_k)
    dist = query_pos[:, :, None] - torch.arange(T, device=q.device)  # (B, P, T)
    near = ((dist >= 0) & (dist <= mem_len))[:, None]  # (B, 1, P, T)
    far = (dist > mem_len)[:, None]  # (B, 1, P, T)
    content = (qa + u[:, None]) @ keys.transpose(-1, -2)  # (B, H, P, T)
    positional = ((qa + v[:, None]) @ rel.transpose(-1, -2)).gather(
        -1, dist.clamp(0, mem_len)[:, None].expand(-1, H, -1, -1))  # (B, H, P, T)
    far_scores = content if cache_bias is None else content + cache_bias[:, None, None]
    seen = far if agg_cache else torch.zeros_like(far)
    scores = torch.where(near, content + positional, torch.where(seen, far_scores, -math.inf))
    return scores.to(acc).softmax(-1), near, far


@torch.no_grad()
def answer_attention(q: Tensor, keys: Tensor, values: Tensor, codes: Tensor | None, *, rel: Tensor, u: Tensor,
                     v: Tensor, mem_len: int, agg_cache: bool, cache_bias: Tensor | None, query_pos: Tensor,
                     target_pos: Tensor, value_tok: Tensor) -> dict[str, Tensor]:
    """The diagnosis fields of the answers at ``query_pos`` (B, P) whose written VALUE is at ``target_pos``
    (B, P) (see the module docstring), from :func:`answer_probs` and values (B, H, T, D_v), codes (B, H, T)
    (None: dense) and value_tok (B, T) long, the token at each VALUE position and -1 elsewhere. -> per
    answer (B, H, P) float: attn_target, attn_window, attn_far, and with codes group, other_values,
    rival_values, attn_code, cos_mean, cos_all (NaN for answers within the window)."""
    probs, near, far = answer_probs(q, keys, rel=rel, u=u, v=v, mem_len=mem_len, agg_cache=agg_cache,
                                    cache_bias=cache_bias, query_pos=query_pos)
    H, T, acc = probs.shape[1], probs.shape[3], probs.dtype
    target = target_pos[:, None, :, None].expand(-1, H, -1, 1)  # (B, H, P, 1)
    out = {"attn_target": probs.gather(-1, target)[..., 0], "attn_window": (probs * near).sum(-1),
           "attn_far": (probs * far).sum(-1)}
    if codes is None:
        return out
    code_w = codes.gather(2, target[..., 0])  # (B, H, P)
    group = (codes[:, :, None, :] == code_w[..., None]) & far  # (B, H, P, T): old keys of w's code
    n_group = group.sum(-1)  # (B, H, P)
    tok = value_tok[:, None, None, :]  # (B, 1, 1, T)
    others = group & (tok >= 0) & (torch.arange(T, device=q.device) != target)  # (B, H, P, T)
    rivals = others & (tok != value_tok.gather(1, target_pos)[:, None, :, None])  # another value than w's
    mean = (group.to(acc) @ values.to(acc)) / n_group.clamp_min(1)[..., None]  # (B, H, P, D_v)
    every = (far.to(acc) @ values.to(acc)) / far.sum(-1).clamp_min(1)[..., None]  # (B, H, P, D_v)
    v_w = values.to(acc).gather(2, target.expand(-1, -1, -1, values.shape[-1]))  # (B, H, P, D_v)
    cached = (query_pos - target_pos > mem_len)[:, None]  # (B, 1, P): w is in the cache
    nan = torch.tensor(math.nan, dtype=acc, device=q.device)
    out.update({name: torch.where(cached, x.to(acc), nan) for name, x in (
        ("group", n_group), ("other_values", others.sum(-1)), ("rival_values", rivals.sum(-1)),
        ("attn_code", (probs * group).sum(-1)),
        ("cos_mean", torch.cosine_similarity(mean, v_w, -1)),
        ("cos_all", torch.cosine_similarity(every, v_w, -1)))})
    return out


@torch.no_grad()
def unit_terms(attn, x: Tensor) -> dict:
    """An attention sublayer's q, keys, values and codes on its input x (B, T, D) (eval mode: no
    dropout), one entry per query head, and its position terms: the arguments of
    :func:`answer_attention`."""
    cfg = attn.config
    B, T, _ = x.shape
    Hq, Hkv, Dk, Dv = cfg.n_q_head, cfg.n_kv_head, cfg.d_k, cfg.head_d_v
    h = attn.norm(x)
    q, k, v, _, _ = attn._projections(h)  # normalized and scaled: (B, T, H_q, D_k), (B, T, H_kv, D_k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H_q, T, D_k), (B, H_kv, T, D_k)
    v = v.view(B, T, Hkv, Dv).transpose(1, 2)  # (B, H_kv, T, D_v)
    rel, u, vb = attn.position_terms(h.dtype)
    codes = None
    if attn.quantizer is not None:
        quant = attn.quantizer(k)
        k, codes = quant.keys, per_query_head(quant.codes, Hq)
    return dict(q=q, keys=per_query_head(k, Hq), values=per_query_head(v, Hq), codes=codes,
                rel=per_query_head(rel, Hq, 0), u=u, v=vb, mem_len=cfg.mem_len,
                agg_cache=cfg.attention == "full" or attn.uses_cache(),
                cache_bias=None if attn.cache_bias is None else attn.cache_bias.float())


class HookRecorder:
    """Keeps, per module, the tensors its hook gave since :meth:`clear` (one piece per call); :meth:`close`
    removes the hooks. Subclasses register the hooks with :meth:`_keep`."""

    def __init__(self, n: int):
        self._parts: list[list[Tensor]] = [[] for _ in range(n)]
        self.handles: list = []

    def _keep(self, i: int, t: Tensor) -> None:
        self._parts[i].append(t.detach())

    def clear(self) -> None:
        self._parts = [[] for _ in self._parts]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class InputRecorder(HookRecorder):
    """Keeps the input of each attention sublayer since :meth:`clear` (forward pre-hooks; a forward in
    segments appends one piece per segment)."""

    def __init__(self, model: TransformerVQ):
        super().__init__(len(model.attns))
        self.handles = [a.register_forward_pre_hook(lambda m, args, i=i: self._keep(i, args[0]))
                        for i, a in enumerate(model.attns)]

    def inputs(self) -> list[Tensor]:
        """Per sublayer, its input (B, T, D)."""
        return [torch.cat(parts, 1) for parts in self._parts]


@torch.no_grad()
def diagnose(model: TransformerVQ, data, value_ids: tuple[int, int]) -> dict:
    """Per-answer diagnosis of ``model`` on held-out ``data`` (ids, labels, dist, written) whose value
    tokens are ids in [value_ids): ``answers`` (columns: distance, correct, and per unit its fields)
    and ``summary`` (accuracy conditioned on each field, per unit)."""
    model.eval()
    recorder = InputRecorder(model)
    heads = model.attns[0].config.n_q_head
    units = [f"{i}" if heads == 1 else f"{i}.{h}" for i in range(len(model.attns)) for h in range(heads)]
    cols: dict[str, list] = {"distance": [], "correct": []}
    fields: list[dict[str, list]] = [{} for _ in units]
    try:
        ids, labels, dist, _ = (t.to(model.embed.weight.device) for t in data)
        rows = max(1, 16384 // ids.shape[1])
        for lo in range(0, ids.shape[0], rows):
            recorder.clear()
            x_ids, lab, d = ids[lo: lo + rows], labels[lo: lo + rows], dist[lo: lo + rows]
            logits = model(x_ids).logits
            at = lab != IGNORE_INDEX  # (b, T), the same count per row
            query_pos = at.nonzero()[:, 1].view(x_ids.shape[0], -1)  # (b, P)
            target_pos = query_pos - d.gather(1, query_pos)  # (b, P)
            is_value = (x_ids >= value_ids[0]) & (x_ids < value_ids[1])  # (b, T)
            value_tok = torch.where(is_value, x_ids, -1)  # (b, T)
            cols["distance"].append(d.gather(1, query_pos).flatten())
            cols["correct"].append((logits.argmax(-1) == lab).gather(1, query_pos).flatten())
            for g, (attn, x) in enumerate(zip(model.attns, recorder.inputs())):
                res = answer_attention(**unit_terms(attn, x), query_pos=query_pos, target_pos=target_pos,
                                       value_tok=value_tok)
                for h in range(heads):
                    for name, val in res.items():
                        fields[g * heads + h].setdefault(name, []).append(val[:, h].flatten())
    finally:
        recorder.close()
        model.train()
    distance = torch.cat(cols["distance"]).cpu()
    correct = torch.cat(cols["correct"]).float().cpu()
    window = model.config.mem_len
    per_unit = {u: {k: torch.cat(v).cpu() for k, v in f.items()} for u, f in zip(units, fields)}
    answers = {"distance": distance.tolist(), "correct": correct.int().tolist(),
               "units": {u: {k: [None if math.isnan(x) else round(x, 5) for x in v.tolist()] for k, v in f.items()}
                         for u, f in per_unit.items()}}
    return {"window": window, "answers": answers, "summary": summarise(distance, correct, per_unit, window)}


def _acc(correct: Tensor, sel: Tensor) -> dict:
    n = int(sel.sum())
    return {"n": n, "accuracy": correct[sel].mean().item() if n else None}


def summarise(distance: Tensor, correct: Tensor, per_unit: dict[str, dict[str, Tensor]], window: int) -> dict:
    """Accuracy within and beyond the window, and per unit: the mean of each field within / beyond the
    window, and the accuracy beyond it conditioned on each field (bins :data:`BINS`, [lo, hi))."""
    far = distance > window
    out = {"within": _acc(correct, ~far), "beyond": _acc(correct, far), "units": {}}
    for unit, f in per_unit.items():
        rec: dict = {"mean_within": {k: _mean(v[~far]) for k, v in f.items()},
                     "mean_beyond": {k: _mean(v[far]) for k, v in f.items()}, "beyond_by": {}}
        if "group" in f:
            rec["beyond_by"]["collided"] = _acc(correct, far & (f["rival_values"] > 0))
            rec["beyond_by"]["clean"] = _acc(correct, far & (f["rival_values"] == 0))
        for name, edges in BINS.items():
            if name in f:
                rec["beyond_by"][name] = [{"lo": lo, "hi": None if math.isinf(hi) else hi,
                                           **_acc(correct, far & (f[name] >= lo) & (f[name] < hi))}
                                          for lo, hi in zip(edges[:-1], edges[1:])]
                rec["beyond_by"][name][0]["lo"] = None if math.isinf(edges[0]) else edges[0]
        out["units"][unit] = rec
    return out


def _mean(x: Tensor) -> float | None:
    x = x[~x.isnan()]
    return x.mean().item() if x.numel() else None


def code_health(model: TransformerVQ, codes: list[Tensor]) -> dict[str, list[float]]:
    """Per quantizer: the fraction of codes with EMA count < 1 (dead), and the usage (fraction of codes
    used) and normalized entropy of ``codes`` (B, H, T), the codes of the last batch."""
    out: dict[str, list[float]] = {"dead": [], "usage": [], "entropy": []}
    for q, c in zip(model._quantizers(), codes):
        counts = torch.bincount(c.flatten(), minlength=q.n_code).float()  # (S,)
        p = counts / counts.sum().clamp_min(1.0)
        ent = -(p * p.clamp_min(1e-30).log()).sum().item()
        out["dead"].append((q.c_count < 1.0).float().mean().item())
        out["usage"].append((counts > 0).float().mean().item())
        out["entropy"].append(ent / math.log(q.n_code) if q.n_code > 1 else 1.0)
    return out
