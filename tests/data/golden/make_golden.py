"""Write the golden files of tests/test_golden.py: a tiny checkpoint per head type and, for a fixed set of
model variants, float64 logits, loss, every parameter gradient (in registration order), the codebook
statistics and update, the carried state and decoder logits.

The committed files were made by tvq at commit 794bc9b, before the attention sublayers were merged into one
module (issue 22); the test checks that the code of today loads those checkpoints and computes the same
numbers. Run ``python tests/data/golden/make_golden.py`` only to record a deliberate change of the model's
function, and say so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tvq import TransformerVQ, TransformerVQConfig
from tvq.layers.vq import VectorQuantizer

HERE = Path(__file__).resolve().parent
HEAD_TYPES = ("shga", "mha", "mqa")

# the model variants: config overrides of the checkpoint's config, and forward options
CASES = {
    "window": {},
    "block": {"straight_through": "block"},
    "window_stop": {"grad_thru_cache": False},
    "block_stop": {"straight_through": "block", "grad_thru_cache": False},
    "nocache": {"agg_cache": False, "cache_bias": False},
    "quadratic": {"attn_impl": "quadratic"},
    "quadratic_block": {"attn_impl": "quadratic", "straight_through": "block"},
    "nobias": {"cache_bias": False},
    "full": {"attention": "full", "cache_bias": False},
    "left_pad": {"_left_pad": [0, 5]},
    "token_mask": {"_token_mask": True},
}


def base_config(head_type: str) -> TransformerVQConfig:
    return TransformerVQConfig(vocab_size=16, d_model=8, d_k=4, d_v=8, n_head=2, n_layer=1, n_code=8,
                               block_len=4, mem_len=8, head_type=head_type, cache_bias=True,
                               cache_bias_init=-0.5)


def make_checkpoint_model(head_type: str) -> TransformerVQ:
    """Random weights with no special structure (every parameter and codeword perturbed)."""
    torch.manual_seed({"shga": 0, "mha": 1, "mqa": 2}[head_type])
    model = TransformerVQ(base_config(head_type))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, VectorQuantizer):
                m.c_sum.normal_(0.0, m.d_k**-0.25)
                m.c_count.uniform_(0.5, 2.0)
                m.c_sum.mul_(m.c_count[..., None])
    return model


def case_model(weights: dict, head_type: str, overrides: dict) -> TransformerVQ:
    """The checkpoint's weights in float64 under a changed config (keys the variant has no use for dropped)."""
    config = base_config(head_type).replace(**{k: v for k, v in overrides.items() if not k.startswith("_")})
    model = TransformerVQ(config).double()
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in weights.items() if k in own})
    return model.train()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 16, (2, 42), generator=g)
    labels = torch.randint(0, 16, (2, 42), generator=g)
    return ids[:, :29], labels[:, :29], ids[:, 29:], labels[:, 29:]


def run_case(model: TransformerVQ, overrides: dict) -> dict[str, torch.Tensor]:
    """Two chunks (the second continues the first's state, gradient through it), one backward, one
    codebook update."""
    ids1, labels1, ids2, labels2 = inputs()
    kwargs = {}
    if "_left_pad" in overrides:
        kwargs["left_pad"] = torch.tensor(overrides["_left_pad"])
    mask2 = None
    if overrides.get("_token_mask"):
        mask2 = torch.ones_like(ids2, dtype=torch.bool)
        mask2[1, 6:] = False
    out1 = model(ids1, labels=labels1, **kwargs)
    out2 = model(ids2, state=out1.state, labels=labels2, token_mask=mask2)
    loss = out1.loss + out2.loss
    loss.backward()
    rec = {"logits1": out1.logits, "logits2": out2.logits, "loss": loss, "commit": out1.commit_loss + out2.commit_loss}
    for i, p in enumerate(model.parameters()):
        rec[f"grad/{i:03d}"] = p.grad
    rec["codebook_stats"] = model.codebook_stats()
    model.update_codebooks()
    # the buffers, but the statistics accumulator (a buffer since issue 24: it is recorded above) and the scaled
    # sinusoid table (a buffer since issue 25, derived from the table)
    for i, b in enumerate(b for name, b in model.named_buffers()
                          if not name.endswith(("quantizer._stats", "sin.scaled_table"))):
        rec[f"buffer/{i:03d}"] = b
    for i, layer in enumerate(out2.state.layers):
        for name in ("keys", "values", "codes", "cache_count", "cache_mean"):
            t = getattr(layer, name)
            if t is not None:
                rec[f"state/{i}/{name}"] = t
    return {k: v.detach().clone().contiguous() for k, v in rec.items()}


def run_decode(model: TransformerVQ) -> dict[str, torch.Tensor]:
    """Eval mode: a 13-token prompt, then 10 decoder steps on fixed tokens."""
    model.eval()
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 16, (2, 13), generator=g)
    steps = torch.randint(0, 16, (10, 2), generator=g)
    with torch.no_grad():
        out = model(prompt)
        dec = model.decoder(out.state)
        logits = [dec.step(t) for t in steps]
    return {"prompt_logits": out.logits, "step_logits": torch.stack(logits)}


def main() -> None:
    for head_type in HEAD_TYPES:
        model = make_checkpoint_model(head_type)
        ckpt = HERE / head_type
        ckpt.mkdir(exist_ok=True)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(ckpt / "model.safetensors"))
        (ckpt / "meta.json").write_text(json.dumps({"step": 0, "config": model.config.to_dict()}, indent=2) + "\n")
        expected = {}
        for name, overrides in CASES.items():
            for key, value in run_case(case_model(weights, head_type, overrides), overrides).items():
                expected[f"{name}/{key}"] = value
        for key, value in run_decode(case_model(weights, head_type, {})).items():
            expected[f"decode/{key}"] = value
        save_file(expected, str(HERE / f"{head_type}_expected.safetensors"))
        print(head_type, len(expected), "tensors")


if __name__ == "__main__":
    main()
