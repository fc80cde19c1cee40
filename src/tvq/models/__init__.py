"""Complete models."""

from tvq.models.transformer_vq import TransformerVQ, TransformerVQOutput

__all__ = ["TransformerVQ", "TransformerVQOutput"]
