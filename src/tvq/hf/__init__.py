"""Hugging Face integration: tvq models as ``transformers`` models (``pip install "tvq[hf]"``).

Importing this module registers ``model_type = "transformer_vq"`` with ``AutoConfig`` and
``AutoModelForCausalLM``; ``tvq export`` writes folders that load with ``trust_remote_code=True``.
The core ``tvq`` package never imports this module or ``transformers``.
"""

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('tvq.hf needs the Hugging Face extra: pip install "tvq[hf]"') from err

from transformers import AutoConfig, AutoModelForCausalLM

from tvq.hf.cache import TransformerVQCache
from tvq.hf.callbacks import CodebookUpdateCallback
from tvq.hf.config import MAX_LENGTH, TransformerVQHFConfig
from tvq.hf.model import TransformerVQCausalLMOutput, TransformerVQForCausalLM

AutoConfig.register(TransformerVQHFConfig.model_type, TransformerVQHFConfig, exist_ok=True)
AutoModelForCausalLM.register(TransformerVQHFConfig, TransformerVQForCausalLM, exist_ok=True)

__all__ = ["MAX_LENGTH", "CodebookUpdateCallback", "TransformerVQCache", "TransformerVQCausalLMOutput",
           "TransformerVQForCausalLM", "TransformerVQHFConfig"]
