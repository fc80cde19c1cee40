"""Model building blocks: norms, positions, vector quantization, the attention sublayer (every head type), the MLP."""
