"""tvq as a Hugging Face model: config round trip, forward, cache, padding and generate (float64, CPU)."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from tvq import TransformerVQConfig  # noqa: E402
from tvq.hf import TransformerVQCache, TransformerVQForCausalLM, TransformerVQHFConfig  # noqa: E402
from conftest import make_model  # noqa: E402


def hf_model(seed=0, **overrides) -> TransformerVQForCausalLM:
    """An HF model holding make_model's float64 weights."""
    core = make_model(seed, **overrides)
    model = TransformerVQForCausalLM(TransformerVQHFConfig.from_tvq(core.config)).double()
    model.model.load_state_dict(core.state_dict())
    return model.eval()


def changed(value, name):
    """A different valid value of a config field, where one is obvious."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return 0.25 if value == 0 else value / 2
    return {"attention": "full", "attn_impl": "quadratic", "straight_through": "block",
            "head_type": "mqa"}.get(name, value)


def test_config_carries_every_field(tmp_path):
    cfg = TransformerVQConfig()
    for f in dataclasses.fields(TransformerVQConfig):  # change every field the fields before it allow
        try:
            cfg = cfg.replace(**{f.name: changed(getattr(cfg, f.name), f.name)})
        except ValueError:
            pass
    hf = TransformerVQHFConfig.from_tvq(cfg)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "transformer_vq"
    for f in dataclasses.fields(TransformerVQConfig):
        assert saved[f.name] == getattr(cfg, f.name), f.name
    for loaded in (TransformerVQHFConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, TransformerVQHFConfig)
        assert loaded.tvq_config() == cfg
    with pytest.raises(ValueError, match="n_head"):
        TransformerVQHFConfig(n_head=0)


@pytest.mark.parametrize("head_type", ["shga", "mqa"])
def test_save_and_load_round_trip(tmp_path, ids, head_type):
    model = hf_model(head_type=head_type)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded, TransformerVQForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_forward_equals_tvq_forward_and_cache_continues(ids):
    model = hf_model(n_layer=2)
    core = model.model
    with torch.no_grad():
        ref = core(ids)
        out = model(ids, use_cache=False)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-10, rtol=0)
        assert out.cache is None
        # a prompt, then a chunk, then single tokens through the cache (the decoder): the same logits
        first = model(ids[:, :50])
        cache = first.past_key_values
        assert isinstance(cache, TransformerVQCache) and cache.get_seq_length() == 50
        parts = [first.logits, model(ids[:, 50:90], past_key_values=cache).logits]
        parts += [model(ids[:, t: t + 1], past_key_values=cache).logits for t in range(90, 110)]
        torch.testing.assert_close(torch.cat(parts, 1), ref.logits[:, :110], atol=1e-10, rtol=0)
    # labels: the usual HF shift, loss = the mean next-token cross entropy (plus commitment in training)
    out = model(ids, labels=ids)
    lm = torch.nn.functional.cross_entropy(ref.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, lm, atol=1e-10, rtol=0)
    model.train()
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, lm + core.config.commit_weight * out.commit_loss, atol=1e-10, rtol=0)


def left_padded(rows, pad_id=0):
    n = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((n - len(r),), pad_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(n - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    return ids, mask


@pytest.mark.parametrize("attn_impl", ["blockwise", "quadratic"])
def test_left_padded_batch_equals_rows_alone(attn_impl):
    model = hf_model(1, attn_impl=attn_impl, n_layer=2)
    torch.manual_seed(5)
    rows = [torch.randint(1, 50, (n,)) for n in (37, 5, 20, 12)]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        for b, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(logits[b, -len(row):], alone, atol=1e-10, rtol=0)
            assert torch.equal(gen[b, ids.shape[1]:], model.generate(row[None], max_new_tokens=12, do_sample=False)[0, len(row):])


def test_right_padding_and_bad_masks():
    model = hf_model(2)
    torch.manual_seed(6)
    rows = [torch.randint(1, 50, (n,)) for n in (30, 9)]
    n = 30
    ids = torch.stack([torch.cat([r, torch.zeros(n - len(r), dtype=torch.long)]) for r in rows])
    mask = (torch.arange(n)[None] < torch.tensor([30, 9])[:, None]).long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        for b, row in enumerate(rows):
            torch.testing.assert_close(out.logits[b, :len(row)], model(row[None]).logits[0], atol=1e-10, rtol=0)
        with pytest.raises(ValueError, match="right padding"):
            model(ids[:, :1], attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                  past_key_values=out.past_key_values)
        hole = torch.ones(2, n, dtype=torch.long)
        hole[0, 10] = 0
        with pytest.raises(ValueError, match="between real tokens"):
            model(ids, attention_mask=hole)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


def test_generate_greedy_sampling_and_streamer(ids):
    model = hf_model(3, n_layer=2)
    prompt = ids[:1, :30]
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=20, do_sample=False)
        ours = model.model.generate(prompt, 20, temperature=0)
        assert torch.equal(greedy, ours)  # token for token
        assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=True, top_k=1), ours)
        streamer = Collect()
        model.generate(prompt, max_new_tokens=8, do_sample=False, streamer=streamer)
        assert streamer.chunks[-1] is None
        assert torch.equal(torch.cat([c.flatten() for c in streamer.chunks[1:-1]]), ours[0, 30:38])
        torch.manual_seed(0)
        a = model.generate(prompt.repeat(3, 1), max_new_tokens=15, do_sample=True, top_p=0.9, temperature=0.8)
        torch.manual_seed(0)
        b = model.generate(prompt.repeat(3, 1), max_new_tokens=15, do_sample=True, top_p=0.9, temperature=0.8)
        assert a.shape == (3, 45) and torch.equal(a, b)
        beams = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
        assert beams.shape == (1, 36)


def test_cache_size_is_constant_per_token(ids):
    model = hf_model(4)
    with torch.no_grad():
        out = model.generate(ids[:1, :10], max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             return_dict_in_generate=True)
        small = out.past_key_values.nbytes()
        out = model.generate(ids[:1, :10], max_new_tokens=100, min_new_tokens=100, do_sample=False,
                             return_dict_in_generate=True)
        assert out.past_key_values.get_seq_length() >= 109
        assert out.past_key_values.nbytes() == small > 0


def test_generation_config_defaults():
    model = hf_model()
    assert isinstance(model.generation_config, GenerationConfig)
    assert model.config.bos_token_id == model.config.eos_token_id == model.config.pad_token_id == 0


@pytest.mark.parametrize("head_type", ["shga", "mqa"])
def test_folders_with_the_old_key_names_load(tmp_path, head_type):
    """A folder saved before the attention sublayers were renamed (``gaus.N``, mha/mqa ``w_kv``) loads with
    its own weights, not freshly initialised ones."""
    from safetensors.torch import load_file, save_file

    model = hf_model(head_type=head_type)
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    old = {k.replace("attns.", "gaus.").replace(".w_kvg.", ".w_kvg." if head_type == "shga" else ".w_kv."): v
           for k, v in weights.items()}
    assert old.keys() != weights.keys()
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = TransformerVQForCausalLM.from_pretrained(tmp_path).double().eval()
    ids = torch.randint(0, 50, (2, 19))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-12, rtol=0)
    loaded.save_pretrained(tmp_path / "again")  # saved with today's names, not renamed back
    assert load_file(str(tmp_path / "again" / "model.safetensors")).keys() == weights.keys()
