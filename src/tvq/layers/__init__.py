"""Model building blocks: norms, positions, vector quantization, the GAU."""
