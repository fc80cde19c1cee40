"""The MLP sublayer of the mha/mqa models (the official optimized code's variants)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from tvq.config import TransformerVQConfig
from tvq.layers.norm import RMSNorm
from tvq.layers.residual import add_residual


class MLP(nn.Module):
    """x + LayerDrop(relu(norm(x) W_1)^2 W_2): pre-norm (RMS, no gain or bias, as the official code),
    ReLU squared, no biases, hidden width ``config.ff_width``."""

    @staticmethod
    def projections(config: TransformerVQConfig) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection (see :meth:`tvq.layers.attention.Attention.projections`)."""
        return {"w_1": (config.d_model, config.ff_width), "w_2": (config.ff_width, config.d_model)}

    def __init__(self, config: TransformerVQConfig):
        super().__init__()
        self.config = config
        self.norm = RMSNorm(config.d_model, config.norm_eps, affine=False)
        shapes = self.projections(config)
        self.w_1 = nn.Linear(*shapes["w_1"], bias=False)
        self.w_2 = nn.Linear(*shapes["w_2"], bias=False)

    def reset_parameters(self) -> None:
        """Fan-in scaled normal kernels, like every dense kernel of the model."""
        for lin in (self.w_1, self.w_2):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, D) -> x + the MLP's residual (B, T, D)."""
        h, x = self.norm(x, residual=True)  # (B, T, D); x's two gradients joined in the norm's backward
        res = self.w_2(F.relu(self.w_1(h)).square())  # (B, T, D)
        return add_residual(x, res, 0.0, self.config.layerdrop, self.training)
