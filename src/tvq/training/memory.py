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

from tvq.config import TransformerVQConfig

FLOAT = 4  # bytes: parameters, gradients, optimizer moments and activations are float32


def model_elements(config: TransformerVQConfig) -> tuple[int, int]:
    """(parameters, codebook entries) of ``TransformerVQ(config)``, at the least: the embeddings,
    the output head and each GAU's projections and codebook (norms and small vectors left out)."""
    c = config
    D, Dk, Dv, Hq, Hkv = c.d_model, c.d_k, c.head_d_v, c.n_q_head, c.n_kv_head
    per_layer = D * (Hq * Dk + Hkv * (2 * Dk + Dv)) + Hq * Dv * D  # q, r + k + v, o (per attention sublayer)
    if c.head_type == "shga":
        per_layer += D * Hq * Dv  # the gate
    else:
        per_layer += 2 * D * c.ff_width  # the MLP sublayer
    params = c.vocab_size * D * (1 if c.tie_embeddings else 2) + c.n_gau * per_layer
    codebooks = c.n_gau * Hkv * c.n_code * (Dk + 1) if c.attention == "vq" else 0  # sums and counts
    return params, codebooks


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has in all: a GPU's total memory, else the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no limit known
        return 2**63 - 1


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
        # per token: input, q, k, v, output (+ gate, or + the MLP's hidden layer)
        per_gau = c.d_model + c.n_q_head * (c.d_k + 2 * c.head_d_v) + c.n_kv_head * (c.d_k + c.head_d_v)
        per_gau += c.n_q_head * c.head_d_v if c.head_type == "shga" else c.ff_width
        kept = c.d_model * c.n_gau + per_gau if c.grad_checkpoint else per_gau * c.n_gau
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
