"""The family of ``tvq recall`` streams: :class:`RecallTask` (one synthetic stream) and :data:`TASKS`
(the named variants, see docs/recall.md).

A row is ``seq_len`` tokens of random filler into which ``n_pairs`` items ``KEY VALUE`` are written
(KEY: ``key_len`` tokens; keys distinct in a row) and each key is later queried once, as
``? KEY VALUE`` (``marker``) or as ``KEY VALUE`` (the key's second occurrence is the query). The answer
is the VALUE, predicted at the query's last KEY token; its distance is the number of tokens from the
written VALUE to that token. With ``slot_len`` > 1 the row is cut into slots of that many tokens and
every item starts at a slot (the rest of its last slot is filler). ``n_distractors`` further keys are
each written ``distractor_repeats`` times with random values and never queried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tvq.models.transformer_vq import IGNORE_INDEX

QUERY = 0  # the query marker token; keys, values and filler follow it in the vocabulary


@dataclass
class RecallTask:
    """One synthetic stream (see the module docstring); ``window`` is the models' mem_len, where "near"
    distances end. ``min_dist`` / ``max_dist`` None: as near / far as the layout allows."""

    seq_len: int = 256
    n_pairs: int = 16
    n_keys: int = 32  # key tokens; the key pool is n_keys ** key_len keys
    n_values: int = 32
    n_filler: int = 63
    min_dist: int | None = 2
    max_dist: int | None = 253
    near_frac: float = 0.25
    window: int = 32
    marker: bool = True
    slot_len: int = 1  # 1: free positions
    key_len: int = 1
    n_distractors: int = 0
    distractor_repeats: int = 1

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_pairs", "n_keys", "n_values", "n_filler", "window", "slot_len", "key_len",
                     "distractor_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.n_distractors, int) or self.n_distractors < 0:
            raise ValueError(f"n_distractors must be an int >= 0, got {self.n_distractors!r}")
        if self.key_len > 4:
            raise ValueError(f"key_len must be <= 4, got {self.key_len}")
        if self.seq_len % self.slot_len:
            raise ValueError(f"seq_len {self.seq_len} is not a whole number of slots of slot_len {self.slot_len}")
        n_keys = self.n_pairs + self.n_distractors
        if n_keys > self.key_pool:
            raise ValueError(f"n_pairs ({self.n_pairs}) + n_distractors ({self.n_distractors}) must be <= the key "
                             f"pool n_keys ** key_len ({self.key_pool}): keys are distinct in a row")
        tokens = self.n_pairs * (self._span_write + self._span_query) + \
            self.n_distractors * self.distractor_repeats * self._span_write
        if tokens > self.seq_len:
            raise ValueError(f"{self.n_pairs} pairs and {self.n_distractors * self.distractor_repeats} distractor "
                             f"writes take {tokens} tokens, more than seq_len {self.seq_len}")
        lo, hi = self.dist_range
        self.min_dist = lo if self.min_dist is None else self.min_dist
        self.max_dist = hi if self.max_dist is None else self.max_dist
        if not lo <= self.min_dist <= self.max_dist <= hi:
            raise ValueError(f"need {lo} <= min_dist <= max_dist <= {hi} (the layout's reach), "
                             f"got min_dist {self.min_dist}, max_dist {self.max_dist}")
        if not self._ks(self.min_dist, self.max_dist):
            raise ValueError(f"no distance in [{self.min_dist}, {self.max_dist}] fits slots of {self.slot_len}")
        if not 0.0 <= self.near_frac <= 1.0:
            raise ValueError(f"near_frac must be in [0, 1], got {self.near_frac}")

    # ------------------------------------------------------------------ layout
    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values + self.n_filler

    @property
    def key_pool(self) -> int:
        return self.n_keys ** self.key_len

    @property
    def value_ids(self) -> tuple[int, int]:
        """[lo, hi) of the value tokens."""
        return 1 + self.n_keys, 1 + self.n_keys + self.n_values

    def _span(self, n: int) -> int:
        """Tokens taken by an item of n tokens: whole slots."""
        return -(-n // self.slot_len) * self.slot_len

    @property
    def _span_write(self) -> int:
        return self._span(self.key_len + 1)

    @property
    def _span_query(self) -> int:
        return self._span(int(self.marker) + self.key_len + 1)

    @property
    def dist_range(self) -> tuple[int, int]:
        """The shortest and longest distance the layout allows (the query after the written item, both in
        the row)."""
        m = int(self.marker)
        return self._span_write + m - 1, self.seq_len - self._span_query + m - 1

    def _ks(self, lo: int, hi: int) -> range:
        """Distances in [lo, hi] are d = marker - 1 + slot_len k: the range of k."""
        s, d0 = self.slot_len, int(self.marker) - 1
        return range(-(-(lo - d0) // s), (hi - d0) // s + 1)

    def _distance(self, rng: np.random.Generator) -> int:
        near_hi = min(self.window, self.max_dist)
        near, far = self._ks(self.min_dist, near_hi), self._ks(max(near_hi + 1, self.min_dist), self.max_dist)
        if not near or (far and rng.random() >= self.near_frac):
            ks = far
        else:
            ks = near
        return int(self.marker) - 1 + self.slot_len * int(rng.integers(ks.start, ks.stop))

    def _keys(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n distinct keys (n, key_len) of key token ids."""
        index = rng.choice(self.key_pool, size=n, replace=False)  # (n,)
        digits = index[:, None] // self.n_keys ** np.arange(self.key_len)[::-1] % self.n_keys  # (n, key_len)
        return digits + 1

    # ------------------------------------------------------------------ rows
    def batch(self, rng: np.random.Generator, batch_size: int):
        """-> ids (B, T), labels (B, T) (the value at each query's last KEY token, else -100), distance
        (B, T) (0 except at answers), written (B, n_pairs) the positions of the written VALUEs."""
        T, P, kl, m, s = self.seq_len, self.n_pairs, self.key_len, int(self.marker), self.slot_len
        val0, fill0 = self.value_ids[0], self.value_ids[1]
        ids = rng.integers(fill0, fill0 + self.n_filler, size=(batch_size, T))
        labels = np.full((batch_size, T), IGNORE_INDEX)
        dist = np.zeros((batch_size, T), dtype=np.int64)
        written = np.zeros((batch_size, P), dtype=np.int64)
        sw, sq = self._span_write, self._span_query
        for b in range(batch_size):
            free = np.ones(T, dtype=bool)
            keys = self._keys(rng, P + self.n_distractors)  # (P + n_distractors, key_len)
            values = rng.integers(val0, val0 + self.n_values, size=P)
            for i in range(P):
                for _ in range(1000):
                    d = self._distance(rng)
                    w = s * int(rng.integers(0, (T - sq - d - 1 + m) // s + 1))  # the written item's start
                    q = w + d + 1 - m  # the query's start; its answer at q + m + kl - 1 = w + kl + d
                    if free[w: w + sw].all() and free[q: q + sq].all():
                        break
                else:
                    raise ValueError(self._crowded())
                free[w: w + sw] = free[q: q + sq] = False
                ids[b, w: w + kl + 1] = [*keys[i], values[i]]
                ids[b, q: q + m + kl + 1] = [QUERY] * m + [*keys[i], values[i]]
                labels[b, w + kl + d] = values[i]
                dist[b, w + kl + d] = d
                written[b, i] = w + kl
            if self.n_distractors:
                fake = rng.integers(val0, val0 + self.n_values, size=(self.n_distractors, self.distractor_repeats))
                for i in range(self.n_distractors):
                    for r in range(self.distractor_repeats):
                        for _ in range(1000):
                            w = s * int(rng.integers(0, (T - sw) // s + 1))
                            if free[w: w + sw].all():
                                break
                        else:
                            raise ValueError(self._crowded())
                        free[w: w + sw] = False
                        ids[b, w: w + kl + 1] = [*keys[P + i], fake[i, r]]
        return (torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(dist),
                torch.from_numpy(written))

    def _crowded(self) -> str:
        return (f"could not place {self.n_pairs} pairs and {self.n_distractors} x {self.distractor_repeats} "
                f"distractors in {self.seq_len} tokens with distances {self.min_dist}..{self.max_dist}; "
                "use fewer pairs or longer sequences")


def buckets(window: int) -> dict[str, tuple[int, float]]:
    """Distance buckets (lo, hi], as multiples of the window."""
    return {"within": (0, window), "1-4 windows": (window, 4 * window), "beyond 4": (4 * window, math.inf),
            "beyond": (window, math.inf)}


@dataclass(frozen=True)
class TaskSpec:
    """A named variant: its stream (:class:`RecallTask` fields; the rest default), the model overrides
    it implies for every model variant (e.g. its key width) and its default size."""

    about: str
    stream: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    batch_size: int = 16
    eval_seqs: int = 512


# issue 23's stream: 128 two-token slots, no marker, 16 keys (pool 32) queried once, filler 64, 40% near
_SLOTS = dict(seq_len=256, slot_len=2, marker=False, n_pairs=16, n_keys=32, n_values=32, n_filler=64,
              near_frac=0.4, min_dist=None, max_dist=None)
_DK32 = {"d_k": 32}

TASKS: dict[str, TaskSpec] = {
    "marked": TaskSpec("the default stream: free positions, `? KEY VALUE` queries, 25% near, d_k 64",
                       dict(min_dist=None, max_dist=None)),
    "marked-dk32": TaskSpec("marked with d_k 32", dict(min_dist=None, max_dist=None), _DK32),
    "slots": TaskSpec("issue 23's stream: 128 two-token slots, no marker, 40% near, filler 64, d_k 32",
                      _SLOTS, _DK32),
    "slots-dk64": TaskSpec("slots with d_k 64", _SLOTS),
    "slots-marked": TaskSpec("slots with `? KEY VALUE` queries (two slots each)", dict(_SLOTS, marker=True), _DK32),
    "free": TaskSpec("slots at free positions (no marker)", dict(_SLOTS, slot_len=1), _DK32),
    "pool-1k": TaskSpec("slots with a key pool of 1,024, larger than any codebook here", dict(_SLOTS, n_keys=1024),
                        _DK32),
    "key2": TaskSpec("slots with two-token keys from 8 tokens (64 keys; last tokens shared in a row)",
                     dict(_SLOTS, key_len=2, n_keys=8), _DK32),
    "distract": TaskSpec("slots plus 8 distractor keys, each written 4 times with random values, never queried",
                         dict(_SLOTS, n_distractors=8, distractor_repeats=4), _DK32),
    "near10": TaskSpec("slots with 10% near answers", dict(_SLOTS, near_frac=0.1), _DK32),
    "long-1k": TaskSpec("slots at 1,024 tokens, 32 keys, answers up to the whole row back", dict(_SLOTS, seq_len=1024,
                        n_pairs=32), _DK32, batch_size=4, eval_seqs=256),
    "long-4k": TaskSpec("slots at 4,096 tokens, 32 keys, answers up to the whole row back", dict(_SLOTS, seq_len=4096,
                        n_pairs=32), _DK32, batch_size=2, eval_seqs=256),
}
DEFAULT_TASK = "marked"
SUITE = ("marked", "marked-dk32", "slots", "slots-dk64", "slots-marked", "free", "pool-1k", "key2", "distract",
         "near10", "long-1k")
