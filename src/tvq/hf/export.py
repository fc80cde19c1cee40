"""``tvq export``: a training run's checkpoint as a Hugging Face model folder.

The folder holds ``config.json`` (``model_type`` and ``auto_map``), ``model.safetensors``,
``generation_config.json``, the tokenizer (``tokenizer_config.json``, plus ``tokenizer.model`` for a
SentencePiece run) and two small files, ``modeling_tvq.py`` and ``tokenization_tvq.py``, that import
:mod:`tvq.hf`: ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(OUT, trust_remote_code=True)`` then work wherever tvq is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import GenerationConfig

from tvq.files import write_dir_atomic
from tvq.data.tokenizer import DOC_START
from tvq.hf.config import TransformerVQHFConfig
from tvq.hf.model import TransformerVQForCausalLM
from tvq.hf.tokenizer import TVQByteTokenizer, TVQSentencePieceTokenizer
from tvq.training import checkpoint as ckpt
from tvq.training.trainer import TOKENIZER_FILE

MODELING_FILE = "modeling_tvq.py"
TOKENIZATION_FILE = "tokenization_tvq.py"


class ExportError(ValueError):
    """Bad input to :func:`export` (reported by the CLI as one line, exit code 2)."""


_MODELING = '''"""Transformer-VQ for Hugging Face: the classes live in the tvq package (pip install "tvq[hf]")."""

from tvq.hf import TransformerVQForCausalLM, TransformerVQHFConfig

__all__ = ["TransformerVQForCausalLM", "TransformerVQHFConfig"]
'''

_TOKENIZATION = '''"""tvq's tokenizers for Hugging Face: the classes live in the tvq package (pip install "tvq[hf]")."""

from tvq.hf.tokenizer import TVQByteTokenizer, TVQSentencePieceTokenizer

__all__ = ["TVQByteTokenizer", "TVQSentencePieceTokenizer"]
'''


def export(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest") -> Path:
    """Write checkpoint ``checkpoint`` (``latest``, ``best`` or a step number) of RUN_DIR to OUT_DIR.

    OUT_DIR must not exist: it is written to a temporary folder beside it and renamed into place, so
    nothing is ever overwritten and a failed export leaves nothing behind.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists():
        raise ExportError(f"{out} already exists; tvq export never overwrites: pick a new OUT_DIR")
    core, meta = ckpt.load_model(ckpt.find_checkpoint(run_dir, checkpoint))
    spm_file = run_dir / TOKENIZER_FILE
    vocab = core.config.vocab_size
    if spm_file.is_file():
        tokenizer = TVQSentencePieceTokenizer(str(spm_file))
    else:
        tokenizer = TVQByteTokenizer()
    if tokenizer.vocab_size != vocab:
        raise ExportError(f"{run_dir}: the model has vocabulary {vocab} but its tokenizer has {tokenizer.vocab_size}")

    config = TransformerVQHFConfig.from_tvq(core.config)
    config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.TransformerVQHFConfig",
                       "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.TransformerVQForCausalLM"}
    model = TransformerVQForCausalLM(config)
    model.model.load_state_dict(core.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=DOC_START, eos_token_id=DOC_START,
                                               pad_token_id=DOC_START)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tok_config = tmp / "tokenizer_config.json"
        settings = json.loads(tok_config.read_text())
        settings["auto_map"] = {"AutoTokenizer": [f"{TOKENIZATION_FILE[:-3]}.{type(tokenizer).__name__}", None]}
        tok_config.write_text(json.dumps(settings, indent=2) + "\n")
        (tmp / MODELING_FILE).write_text(_MODELING)
        (tmp / TOKENIZATION_FILE).write_text(_TOKENIZATION)
        (tmp / "README.md").write_text(_model_card(run_dir, meta, core.config.attention))

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_dir_atomic(out, write, replace=False)
    except FileExistsError:
        raise ExportError(f"{out} appeared while exporting; tvq export never overwrites: pick a new OUT_DIR") from None
    return out


def _model_card(run_dir: Path, meta: dict, attention: str) -> str:
    name = "Transformer-VQ" if attention == "vq" else "a dense-attention baseline of Transformer-VQ"
    return f"""---
library_name: transformers
tags: [tvq, transformer-vq]
---
# {run_dir.name}

{name} (Lingle, ICLR 2024), trained with tvq on `{meta.get("data", "?")}`,
exported from step {meta.get("step", "?")} of the run `{run_dir.name}`. Needs tvq installed
(`pip install "tvq[hf]"`).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)
```
"""
