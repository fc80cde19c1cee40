"""Data layer: tokenizers, tokenized corpora and their sources (stdlib, text, enwik8, PG-19, ImageNet64).

`load_corpus(source)` is the entry point; it returns a `Corpus` whose `split(name)` gives the
concatenated tokens and document starts of "train", "validation" or "test".
"""

from tvq.data.cache import default_cache_dir
from tvq.data.corpus import SPLITS, Corpus, Split, count_words
from tvq.data.enwik8 import ENWIK8_MD5, ENWIK8_SIZE, ENWIK8_URL, load_enwik8
from tvq.data.imagenet64 import TOKENS_PER_IMAGE, image_to_tokens, load_imagenet64, save_image_grid, tokens_to_image
from tvq.data.pg19 import PG19_VOCAB_FILE, load_pg19, train_pg19_vocab
from tvq.data.sources import load_corpus, source_info, train_vocab
from tvq.data.textfiles import assign_splits, load_stdlib, load_text_file, load_text_folder
from tvq.data.tokenizer import (DOC_START, ByteTokenizer, SentencePieceTokenizer, Tokenizer, token_dtype,
                                train_sentencepiece)

__all__ = [
    "SPLITS",
    "Corpus",
    "Split",
    "count_words",
    "load_corpus",
    "source_info",
    "train_vocab",
    "DOC_START",
    "default_cache_dir",
    "Tokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "token_dtype",
    "train_sentencepiece",
    "assign_splits",
    "load_stdlib",
    "load_text_file",
    "load_text_folder",
    "ENWIK8_URL",
    "ENWIK8_SIZE",
    "ENWIK8_MD5",
    "load_enwik8",
    "PG19_VOCAB_FILE",
    "load_pg19",
    "train_pg19_vocab",
    "TOKENS_PER_IMAGE",
    "image_to_tokens",
    "tokens_to_image",
    "save_image_grid",
    "load_imagenet64",
]
