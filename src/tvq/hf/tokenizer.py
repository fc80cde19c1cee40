"""tvq's tokenizers as Hugging Face tokenizers (``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)``).

Both encode exactly as tvq's own (:mod:`tvq.data.tokenizer`). Token 0 stands before every document in
training (``DOC_START``), so it is the beginning-of-sequence token, and also the end-of-sequence and
padding token (like GPT-2's single ``<|endoftext|>``). As for GPT-2, encoding adds no special token:
prepend ``bos_token_id`` to score a text as a whole document, which is what lm-eval does for
``loglikelihood_rolling`` and for a continuation with an empty context.
"""

from __future__ import annotations

import os
import shutil

from transformers import PreTrainedTokenizer

from tvq.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from tvq.data.tokenizer import DOC_START
from tvq.hf.config import MAX_LENGTH


class TVQByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes, ids 0..255 (:class:`tvq.data.ByteTokenizer`); byte b's token is ``chr(b)``."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs):
        special = chr(DOC_START)
        for name in ("bos_token", "eos_token", "pad_token"):
            kwargs.setdefault(name, special)
        kwargs.setdefault("model_max_length", MAX_LENGTH)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        self._bytes = ByteTokenizer()
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self._bytes.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in self._bytes.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) != 1 or ord(token) >= self.vocab_size:
            raise ValueError(f"{token!r} is not a byte token")
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._bytes.decode([ord(t) for t in tokens])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # nothing to save: the vocabulary is the 256 bytes


class TVQSentencePieceTokenizer(PreTrainedTokenizer):
    """A tvq SentencePiece model (:class:`tvq.data.SentencePieceTokenizer`), from ``tokenizer.model``."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, **kwargs):
        self.vocab_file = vocab_file
        self._spm = SentencePieceTokenizer(vocab_file)
        self._sp = self._spm._sp
        special = self._sp.id_to_piece(DOC_START)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            kwargs.setdefault(name, special)
        kwargs.setdefault("model_max_length", MAX_LENGTH)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self._spm.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._sp.id_to_piece(i) for i in self._spm.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self._sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._spm.decode([self._sp.piece_to_id(t) for t in tokens])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out = os.path.join(save_directory, name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
