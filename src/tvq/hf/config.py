"""The Hugging Face config of a tvq model: every :class:`tvq.TransformerVQConfig` field, plus what the
Hugging Face stack reads (special token ids, ``use_cache``, the context length)."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from tvq.config import TransformerVQConfig
from tvq.data.tokenizer import DOC_START

# What lm-evaluation-harness and other tools read as the context length (``max_position_embeddings``).
# tvq has no position limit (relative positions, a constant-size state), so this only stops those tools
# from cutting documents into windows: 2**20 tokens, longer than any document a benchmark scores, so
# loglikelihood_rolling reads each document in one pass at linear cost.
MAX_LENGTH = 2**20



def tvq_field_names() -> list[str]:
    """The fields of :class:`TransformerVQConfig`, read at run time so that new fields are carried too."""
    return [f.name for f in dataclasses.fields(TransformerVQConfig)]


class TransformerVQHFConfig(PretrainedConfig):
    """:class:`tvq.TransformerVQConfig` as a :class:`~transformers.PretrainedConfig`.

    Every field of the tvq config is an attribute of the same name (and a key of ``config.json``);
    :meth:`tvq_config` builds the validated tvq config back. Unknown keys go to the Hugging Face base.
    """

    model_type = "transformer_vq"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_head"}

    def __init__(self, bos_token_id: int = DOC_START, eos_token_id: int = DOC_START, pad_token_id: int = DOC_START,
                 max_position_embeddings: int = MAX_LENGTH, use_cache: bool = True, **kwargs):
        defaults = TransformerVQConfig()
        for name in tvq_field_names():
            setattr(self, name, kwargs.pop(name, getattr(defaults, name)))
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = False  # tvq ties (or not) by its own tie_embeddings field
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.tvq_config()  # a ValueError naming the bad field, as TransformerVQConfig gives

    def tvq_config(self) -> TransformerVQConfig:
        """The tvq config these attributes describe (validated)."""
        return TransformerVQConfig.from_dict({name: getattr(self, name) for name in tvq_field_names()})

    @classmethod
    def from_tvq(cls, config: TransformerVQConfig, **kwargs) -> "TransformerVQHFConfig":
        return cls(**config.to_dict(), **kwargs)
