"""tvq as a Hugging Face causal language model: ``from_pretrained``, ``generate``, lm-eval."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tvq.hf.cache import TransformerVQCache
from tvq.hf.config import TransformerVQHFConfig
from tvq.layers.position import SinusoidTable
from tvq.models.transformer_vq import IGNORE_INDEX, LEGACY_KEY_RENAMES, TransformerVQ


@dataclass
class TransformerVQCausalLMOutput(CausalLMOutputWithPast):
    """:class:`~transformers.modeling_outputs.CausalLMOutputWithPast` plus the commitment loss (docs/spec.md section 2).

    ``cache`` (``past_key_values``) is a :class:`TransformerVQCache`.
    """

    commit_loss: Tensor | None = None


def _padding(mask: Tensor, first_call: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """An attention mask's (B, T) padding as tvq sees it -> (left_pad (B,), token_mask (B, T), ended (B,)).

    Zeros before a row's first real token are left padding (in the first call only); zeros after its
    last real token are right padding (``ended``); a zero between real tokens cannot be expressed.
    """
    started = mask.cumsum(1) > 0 if first_call else torch.ones_like(mask)  # (B, T) at/after the first real token
    real_after = mask.flip(1).cumsum(1).flip(1) > 0  # (B, T): a real token at or after t
    if (~mask & started & real_after).any():
        raise ValueError("attention_mask has padding between real tokens (or, after the first call, before "
                         "them); tvq supports left padding in the first call and right padding at the end")
    right = ~mask & started  # (B, T) trailing padding
    left_pad = (~started).sum(1) if first_call else None
    ended = right.any(1)
    token_mask = (mask | ~started) if ended.any() else None
    return left_pad, token_mask, ended if ended.any() else None


class TransformerVQForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`~tvq.TransformerVQ` (``self.model``) behind the Hugging Face causal-LM interface.

    ``forward(input_ids, attention_mask=None, past_key_values=None, labels=None, use_cache=True)``:
    labels are the inputs (shifted inside, as for every Hugging Face causal LM), ``-100`` ignored;
    ``attention_mask`` may left-pad the first call (each row then computes exactly what it computes
    alone) and right-pad any call (a right-padded row cannot be continued). ``loss`` is the language
    modelling loss, plus ``commit_weight`` times the commitment loss in training mode (tvq's objective).
    Codebooks are EMA buffers, not parameters: train with the Hugging Face ``Trainer`` and
    ``callbacks=[CodebookUpdateCallback()]`` (:class:`tvq.hf.CodebookUpdateCallback`), or have a training
    loop of its own call ``model.model.update_codebooks()`` after each optimizer step; otherwise they stay as
    loaded.

    ``generate`` decodes one token per step with a :class:`~tvq.models.decoding.VQDecoder` held by the cache;
    on a CUDA device each step is one CUDA graph replay (captured at the first step, kept through beam
    reorderings). ``model.generate(..., cuda_graph=False)`` turns that off (``True`` off CUDA: a ValueError).
    The step computes in the parameters' dtype, or the autocast dtype when generating under autocast.
    """

    config_class = TransformerVQHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Attention", "MLP"]
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, also reading folders exported by tvq before its attention
        sublayers were renamed (transformers loads weights without the core model's load hooks)."""
        kwargs["key_mapping"] = {**LEGACY_KEY_RENAMES, **(kwargs.get("key_mapping") or {})}
        model = super().from_pretrained(*args, **kwargs)
        # transformers reverses a load's renamings when it saves; today's names are the ones to save
        model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                                     if getattr(c, "_original_source_patterns", None) not in
                                     ([p] for p in LEGACY_KEY_RENAMES)]
        return model

    def __init__(self, config: TransformerVQHFConfig):
        super().__init__(config)
        self.model = TransformerVQ(config.tvq_config())
        self.post_init()

    def _init_weights(self, module) -> None:
        """tvq initialises its parameters itself (paper initialisation) when a module is built; only the
        sinusoid tables, buffers that are computed and never saved, are recomputed here, as
        ``from_pretrained`` builds the model on the meta device and leaves them uninitialised."""
        if isinstance(module, SinusoidTable):
            module.reset_table()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward makes its own TransformerVQCache

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: TransformerVQCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        cache: TransformerVQCache | None = None,
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cuda_graph: bool | None = None,
        **kwargs,
    ) -> TransformerVQCausalLMOutput | tuple:
        if past_key_values is not None and cache is not None:
            raise ValueError("pass the cache as past_key_values or as cache, not both")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("tvq models take input_ids (token ids), not inputs_embeds")
        if cache is not None and not isinstance(cache, TransformerVQCache):
            raise ValueError(f"past_key_values must be a TransformerVQCache (from this model's outputs), "
                             f"got {type(cache).__name__}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        B, T = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        if past and cache.ended is not None and cache.ended.any():
            raise ValueError("the cache ends in right padding, which cannot be continued; pad prompts on the "
                             "left (tokenizer.padding_side = 'left') to generate from a batch")
        left_pad = token_mask = ended = mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must have shape (batch, past + new tokens) = ({B}, {past + T}), "
                                 f"got {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -T:].to(input_ids.device).bool()  # (B, T)
            if not mask.all():
                left_pad, token_mask, ended = _padding(mask, first_call=past == 0)

        shifted = None
        if labels is not None:  # position t predicts labels[t + 1]; padding is no target
            shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
            if mask is not None:
                shifted = shifted.masked_fill(~F.pad(mask[:, 1:], (0, 1), value=False), IGNORE_INDEX)

        decode = (use_cache and past > 0 and T == 1 and labels is None and token_mask is None and not self.training
                  and not torch.is_grad_enabled() and self.config.attention == "vq")
        loss = commit = None
        if decode:  # one token from the in-place decoder: O(mem_len + n_code), nothing allocated
            logits = cache.decoder(self.model, cuda_graph).step(input_ids[:, 0])[:, None]  # (B, 1, V)
        else:
            out = self.model(input_ids, state=None if cache is None else cache.state, labels=shifted,
                             token_mask=token_mask, left_pad=left_pad)
            logits, commit = out.logits, out.commit_loss
            if labels is not None:
                loss = out.loss if self.training else out.lm_loss
            if use_cache:
                cache = cache if cache is not None else TransformerVQCache()
                cache.state, cache.ended = out.state, ended
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        result = TransformerVQCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                             commit_loss=commit)
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: TransformerVQCache | None = None,
                                      past_key_values: TransformerVQCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool | None = None,
                                      cuda_graph: bool | None = None, **kwargs) -> dict:
        """Only the tokens the cache has not seen (once it exists: one per step), with the full mask."""
        cache = cache if cache is not None else past_key_values
        seen = 0 if cache is None else cache.get_seq_length()
        inputs = {"input_ids": input_ids[:, seen:].contiguous(), "attention_mask": attention_mask,
                  "use_cache": use_cache, "cuda_graph": cuda_graph}
        if cache is not None:
            inputs["cache"] = cache
        return inputs
