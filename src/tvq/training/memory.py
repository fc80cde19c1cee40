"""Up-front memory estimates: refuse a config that cannot fit before allocating anything.

A model of ``model.d_model=1e9`` or a ``batch_size=1e9`` would otherwise allocate until the
machine swaps or the kernel kills the job. Both the parameter count (the layers' projections,
embeddings and codebooks) and the activation estimate are lower bounds (what one step must hold
at the least), so a refused config could never have run; they are computed from the config
alone, in microseconds, without building the model.
"""

from __future__ import annotations

import os

import torch

from tvq.config import INT64_MAX, TransformerVQConfig
from tvq.layers.attention import Attention
from tvq.layers.mlp import MLP

FLOAT = 4  # bytes: parameters, gradients, optimizer moments and activations are float32


def _sublayer_projections(config: TransformerVQConfig) -> list[tuple[int, int]]:
    """(in, out) of the projections of one attention sublayer and, for mha/mqa, its MLP."""
    shapes = list(Attention.projections(config).values())
    return shapes if config.gated else shapes + list(MLP.projections(config).values())


def model_elements(config: TransformerVQConfig) -> tuple[int, int]:
    """(parameters, codebook entries) of ``TransformerVQ(config)``, at the least: the embeddings, the
    output head and each sublayer's projections and codebook (norms and small vectors left out)."""
    c = config
    per_layer = sum(n_in * n_out for n_in, n_out in _sublayer_projections(c))
    params = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.n_attn * per_layer
    codebooks = c.n_attn * c.n_kv_head * c.n_code * (c.d_k + 1) if c.attention == "vq" else 0  # sums and counts
    return params, codebooks


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has in all: a GPU's total memory, else the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no limit known
        return INT64_MAX


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n / 2**30:.2e} GiB"


def check_fits(config: TransformerVQConfig, *, device: torch.device, what: str = "the model",
               training: dict | None = None) -> int:
    """Raise ValueError when ``what`` needs more memory than ``device`` has; returns the estimate.

    ``training`` (``tokens``: tokens of one micro-batch on one process, ``batch_tokens``: of the
    sampler's global batch, ``optimizer``, ``grad_checkpoint``) adds gradients, optimizer state and
    activations to the weights.
    """
    params, buffers = model_elements(config)
    weights = FLOAT * (params + buffers)
    need, parts = weights, [f"weights {_gib(weights)} for {params:,} parameters and {buffers:,} codebook entries"]
    if training is not None:
        state = FLOAT * params * (3 if training["optimizer"] == "adamw" else 1)  # gradients (+ Adam moments)
        c = config
        # per token and sublayer: the input, the projections' outputs (q, k, v [, g]), the attention output
        # and its gated (or reshaped) copy, and the MLP's hidden layer
        shapes = Attention.projections(c)
        per_sublayer = c.d_model + shapes["w_q"][1] + shapes["w_kvg"][1] + 2 * c.n_q_head * c.head_d_v
        per_sublayer += 0 if c.gated else c.ff_width
        kept = c.d_model * c.n_attn + per_sublayer if c.grad_checkpoint else per_sublayer * c.n_attn
        acts = FLOAT * training["tokens"] * (kept + 2 * c.vocab_size)  # + logits and their gradient
        acts += 16 * training["batch_tokens"]  # the global batch's inputs and labels (int64)
        need += state + acts
        parts += [f"gradients and optimizer state {_gib(state)}", f"activations at least {_gib(acts)}"]
    have = device_memory(device)
    if need > have:
        fix = "a smaller model (model.d_model, model.d_v, model.n_code, model.n_layer, model.vocab_size)"
        if training is not None and acts > weights + state:
            fix = "a smaller batch_size or update_len, or more grad_accum"
        raise ValueError(f"{what} needs at least {_gib(need)} of memory ({'; '.join(parts)}) but {device.type} "
                         f"has {_gib(have)}; use {fix}")
    return need
