"""tvq: Transformer-VQ in PyTorch, softmax attention in linear time via vector-quantized keys."""

from tvq.config import TransformerVQConfig
from tvq.models.transformer_vq import TransformerVQ, TransformerVQOutput
from tvq.state import LayerState, TransformerVQState

__all__ = ["TransformerVQConfig", "TransformerVQ", "TransformerVQOutput", "LayerState", "TransformerVQState"]
__version__ = "0.1.0"
