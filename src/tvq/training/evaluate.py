"""Long-context evaluation: stream a split through the model with the state carried (``evaluate``),
or a checkpoint of a run on a split of its data (``evaluate_run``, the ``tvq eval`` command)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from tvq.data import ByteTokenizer, Split, load_corpus
from tvq.models.transformer_vq import TransformerVQ
from tvq.parallel import ContextParallel
from tvq.training import checkpoint as ckpt
from tvq.training.batches import shifted_inputs
from tvq.training.distributed import cluster
from tvq.training.rundir import read_config, run_tokenizer
from tvq.usage import UsageError, check_device


@torch.no_grad()
def evaluate(
    model: TransformerVQ,
    split: Split,
    *,
    segment_len: int,
    max_tokens: int = 0,
    reset_every: int = 0,
    byte_level: bool = True,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
    context: ContextParallel | None = None,
    progress: bool = False,
) -> dict:
    """Loss over a split: each document streamed in segments of ``segment_len`` with the state
    carried, from an empty state at the document's start (the paper's long-context evaluation).

    Every token is predicted, the first of a document from the DOC_START input. ``max_tokens``
    > 0 stops after that many predictions; ``reset_every`` > 0 (a multiple of ``segment_len``)
    also empties the state every that many tokens, to score models with the same context.
    Returns ``loss`` (nats per token), ``bpb`` (bits per UTF-8 byte of the raw text), ``tokens``;
    for non-byte tokenizers also ``ppl`` (per token) and, over a whole split, ``word_ppl``.

    With ``world_size`` > 1 (in a torch.distributed process group) the documents are shared out
    over the ranks (largest first, each to the least loaded rank) and the sums all-reduced, so
    every rank returns the result of the whole budget. ``lockstep`` (needed for FSDP, whose
    forwards are collectives) makes every rank run the same number of forwards, padding with
    one-token forwards. With ``context`` (context parallelism: ranks ``d C .. d C + C - 1`` form
    group ``d``) the documents are shared out over the groups instead, and each rank of a group
    scores its contiguous ``1/C`` of every whole segment of them (a last, shorter segment is run
    whole on every rank of the group), with the same result. ``progress`` shows a progress bar of
    this rank's tokens (on stderr).
    """
    if reset_every % segment_len:
        raise ValueError(f"reset_every {reset_every} must be a multiple of segment_len {segment_len}")
    C = 1 if context is None else context.size
    if C > 1:
        if segment_len % C:
            raise ValueError(f"segment_len {segment_len} is not divisible by context_parallel {C}")
        if world_size % C or rank % C != context.rank:
            raise ValueError(f"context parallelism: ranks d C .. d C + C - 1 must form group d (C = {C}, "
                             f"{world_size} ranks)")
        model.config.check_context_chunk(segment_len // C)
    counted = C == 1 or context.rank == 0  # the rank that counts its group's tokens and last, shorter segments
    n_total = len(split.tokens)
    budget = min(max_tokens, n_total) if max_tokens else n_total
    if budget < 1:
        raise ValueError("the evaluation split is empty")
    lengths = np.diff(np.append(split.doc_starts, n_total))
    counts = np.minimum(lengths, np.maximum(budget - np.concatenate([[0], np.cumsum(lengths)[:-1]]), 0))
    mine, forwards = _share_documents(counts, segment_len, world_size // C)
    group, T = rank // C, segment_len // C  # this rank's group; its tokens of a whole segment
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync at the end
    done = 0
    bar = tqdm(total=int(counts[mine[group]].sum()), unit="tok", unit_scale=True, desc="evaluating",
               disable=not progress, dynamic_ncols=True)
    try:
        for d in mine[group]:
            doc, n = split.document(d), int(counts[d])
            state = None
            for start in range(0, n, segment_len):
                if reset_every and start % reset_every == 0:
                    state = None
                length = min(segment_len, n - start)
                inputs = shifted_inputs(doc, np.array([start]), length, np.array([start == 0]))
                labels = doc[start: start + length].astype(np.int64)
                split_up = C > 1 and length == segment_len
                cols = slice(context.rank * T, (context.rank + 1) * T) if split_up else slice(None)
                out = model(torch.from_numpy(inputs[:, cols]).to(device), state=state,
                            context=context if split_up else None)
                if split_up or counted:
                    total += F.cross_entropy(out.logits[0].double(), torch.from_numpy(labels[cols]).to(device),
                                             reduction="sum")
                state = out.state
                bar.update(length)
            done += n if counted else 0
        if lockstep:
            for _ in range(max(forwards) - forwards[group]):
                model(torch.zeros(1, 1, dtype=torch.long, device=device))
    finally:
        bar.close()
        model.train(was_training)
    if world_size > 1:
        sums = torch.stack([total, torch.tensor(float(done), dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(sums)
        total, done = sums[0].item(), int(sums[1].item())
    else:
        total = total.item()
    n_bytes = done if byte_level else split.n_bytes * done / n_total
    result = {"loss": total / done, "bpb": total / math.log(2) / n_bytes, "tokens": done}
    if not byte_level:
        result["ppl"] = math.exp(total / done)
        if done == n_total and split.n_words:
            result["word_ppl"] = math.exp(total / split.n_words)
    return result


def evaluate_run(run_dir: str | Path, *, split: str = "validation", checkpoint: str = "latest",
                 data: str | None = None, max_tokens: int = 0, device: str | None = None,
                 progress: bool = False) -> dict:
    """Score checkpoint ``checkpoint`` (latest, best or a step number) of a run on ``split`` of
    ``data`` (default: the data it was trained on) in segments of the run's ``update_len``:
    :func:`evaluate`'s result plus the ``split``, ``data`` and checkpoint ``step``. Under torchrun the
    documents are shared over the ranks, each update segment over the run's ``context_parallel`` ranks."""
    if data is not None and not data.strip():
        raise UsageError("--data is empty; name a source, or leave it out to use the run's")
    path = ckpt.find_checkpoint(run_dir, checkpoint)
    device = check_device(device)
    run_cfg = read_config(run_dir)
    cp = run_cfg.context_parallel if "WORLD_SIZE" in os.environ else 1  # a plain process scores it all
    with cluster("ddp", 0, 1, run_cfg.dist_timeout, device, cp) as cl:  # no rows to split: batch_size 0
        model, meta = ckpt.load_model(path, cl.device)
        data = data or meta.get("data") or run_cfg.data
        corpus = cl.first_on_each_node(load_corpus, data, tokenizer=run_tokenizer(run_dir, model.config.vocab_size))
        if corpus.vocab_size != model.config.vocab_size:
            raise UsageError(f"data {data!r} has vocabulary {corpus.vocab_size} but the checkpoint's model has "
                             f"{model.config.vocab_size}; evaluate on the data it was trained on")
        result = evaluate(model, corpus.split(split), segment_len=run_cfg.update_len, max_tokens=max_tokens,
                          byte_level=isinstance(corpus.tokenizer, ByteTokenizer), device=cl.device, rank=cl.rank,
                          world_size=cl.world_size, context=cl.context, progress=progress and cl.is_main)
    result.update(split=split, data=data, step=meta["step"])
    return result


def _share_documents(counts: np.ndarray, segment_len: int, world_size: int) -> tuple[list[list[int]], list[int]]:
    """Documents with tokens to score, shared over ranks by forwards (largest first, each to the
    least loaded rank); each rank's list in document order. Returns (lists, forwards per rank)."""
    forwards = [0] * world_size
    mine: list[list[int]] = [[] for _ in range(world_size)]
    segments = -(-counts // segment_len)
    for d in sorted(np.flatnonzero(counts), key=lambda d: -segments[d]):
        r = forwards.index(min(forwards))
        mine[r].append(int(d))
        forwards[r] += int(segments[d])
    return [sorted(m) for m in mine], forwards
