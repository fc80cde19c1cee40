"""The Hugging Face cache of a tvq model: its constant-size :class:`~tvq.TransformerVQState`.

A key/value cache grows by one entry per token; tvq's state does not (a window of ``mem_len`` keys and
a compressive cache of ``n_code`` entries per GAU), so this cache has the same size after 10 tokens as
after a million. While generating token by token it holds a :class:`~tvq.models.decoding.VQDecoder`
(the state in ring buffers, updated in place), otherwise the state itself.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from tvq.models.decoding import VQDecoder, default_cuda_graph
from tvq.state import LayerState, TransformerVQState


class TransformerVQCache(Cache):
    """A :class:`~transformers.cache_utils.Cache` holding one :class:`~tvq.TransformerVQState`.

    ``ended`` (B,) bool marks rows whose last input ended in right padding: they cannot be continued.
    """

    def __init__(self, state: TransformerVQState | None = None):
        super().__init__(layers=[])
        self._state = state
        self._decoder: VQDecoder | None = None
        self.ended: Tensor | None = None

    # ------------------------------------------------------------------ contents
    @property
    def state(self) -> TransformerVQState | None:
        """The state as an ordinary :class:`~tvq.TransformerVQState` (None before the first forward)."""
        if self._decoder is not None:
            self._state, self._decoder = self._decoder.state(), None
        return self._state

    @state.setter
    def state(self, state: TransformerVQState) -> None:
        self._state, self._decoder = state, None

    def decoder(self, model, cuda_graph: bool | None = None) -> VQDecoder:
        """The state as a one-token decoder of ``model`` (a :class:`~tvq.TransformerVQ` in eval mode), made
        at the first decode step and kept while generating; ``cuda_graph``: capture its step in a CUDA graph
        (None: where the model is on a CUDA device)."""
        if self._decoder is None:
            graph = default_cuda_graph(model.embed.weight.device) if cuda_graph is None else cuda_graph
            self._decoder, self._state = model.decoder(self._state, cuda_graph=graph), None
        return self._decoder

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds (to measure its size)."""
        if self._decoder is not None:
            return self._decoder.buffers()
        if self._state is None:
            return []
        out = [t for layer in self._state.layers for t in layer._tensors() if t is not None]
        return out + ([] if self._state.start is None else [self._state.start])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # ------------------------------------------------------- the Cache interface
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions seen (padding included), however many of them the state still holds."""
        if self._decoder is not None:
            return self._decoder.pos
        return 0 if self._state is None else self._state.pos

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit

    @property
    def batch_size(self) -> int:
        if self._decoder is not None:
            return self._decoder.batch_size
        return -1 if self._state is None else self._state.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # the cache folds keys irreversibly: no rollback

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        # a window plus a compressive cache: not a pure linear-attention state, and get_seq_length counts
        # the positions seen, so generate may slice already-seen inputs off as for a key/value cache
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a tvq cache cannot be cropped: its compressive cache cannot forget keys")

    def reset(self) -> None:
        self._state, self._decoder, self.ended = None, None, None

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self._select(torch.arange(self.state.batch_size, device=self.state.layers[0].keys.device)
                         .repeat_interleave(repeats))

    def _select(self, rows: Tensor) -> None:
        """Keep (or repeat) the state's rows ``rows`` (long, any length); a reordering (a beam search's, one per
        step) is done in place in the decoder's buffers, which keeps its CUDA graph."""
        if self._decoder is not None and rows.shape == (self._decoder.batch_size,):
            self._decoder.select_rows_(rows)
            if self.ended is not None:
                self.ended = self.ended.index_select(0, rows.to(self.ended.device))
            return
        state = self.state
        if state is None:
            return
        rows = rows.to(state.layers[0].keys.device)

        def pick(t):
            return None if t is None else t.index_select(0, rows)

        self._state = TransformerVQState(
            [LayerState(*(pick(t) for t in layer._tensors())) for layer in state.layers], state.pos, pick(state.start))
        if self.ended is not None:
            self.ended = self.ended.index_select(0, rows.to(self.ended.device))

    def __repr__(self) -> str:
        return f"TransformerVQCache(pos={self.get_seq_length()}, bytes={self.nbytes()})"
