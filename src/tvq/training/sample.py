"""Samples of a trained run (``tvq sample``): text streamed to stdout token by token, or a PNG grid of
images for an ImageNet64 run."""

from __future__ import annotations

import codecs
import importlib.util
import sys
import unicodedata
from pathlib import Path

import torch
from tqdm import tqdm

from tvq.data import DOC_START, TOKENS_PER_IMAGE, ByteTokenizer, save_image_grid, tokens_to_image
from tvq.models.transformer_vq import TransformerVQ
from tvq.training import checkpoint as ckpt
from tvq.training.rundir import run_tokenizer
from tvq.usage import UsageError, check_device, check_writable_file

_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters other than newline and tab, and the
    bidirectional controls, written as escapes (``\\x1b``), so a sample cannot drive the terminal."""
    def safe(ch: str) -> str:
        if ch in "\n\t" or (unicodedata.category(ch) != "Cc" and ch not in _BIDI_CONTROLS):
            return ch
        return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"

    return "".join(map(safe, text))


def stream_text(model: TransformerVQ, run_dir: str | Path, prompt: str = "", max_new_tokens: int = 256,
                temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None,
                seed: int | None = None, device="cpu", compile: bool = False) -> None:
    """Print ``prompt`` and its continuation as a new document, each byte-level token as it comes
    (a SentencePiece run's text once complete), escaped by :func:`printable`."""
    tokenizer = run_tokenizer(run_dir, model.config.vocab_size) or ByteTokenizer()
    ids = [DOC_START] + tokenizer.encode(prompt)  # a sample starts a new document
    input_ids = torch.tensor([ids], device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    byte_level = isinstance(tokenizer, ByteTokenizer)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets an escape
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout.write(printable(prompt))
    generated: list[int] = []
    for token in model.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, compile=compile):
        generated.append(int(token[0]))
        if byte_level:
            sys.stdout.write(printable(decoder.decode(bytes([generated[-1]]))))
        sys.stdout.flush()
    if not byte_level:
        sys.stdout.write(printable(tokenizer.decode(generated)))
    sys.stdout.write(printable(decoder.decode(b"", final=True)) + "\n")


def sample_images(model: TransformerVQ, out: Path, num_images: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None, device="cpu",
                  compile: bool = False) -> None:
    """Draw ``num_images`` images of an ImageNet64 model and write them to ``out`` as one PNG grid."""
    start = torch.full((num_images, 1), DOC_START, device=device)
    stream = model.stream(start, TOKENS_PER_IMAGE, temperature, top_k, top_p, seed, compile=compile)
    tokens = torch.stack(list(tqdm(stream, total=TOKENS_PER_IMAGE, unit="tok", desc="sampling")), 1)  # (N, 12288)
    save_image_grid([tokens_to_image(t.cpu().numpy()) for t in tokens], out)
    print(f"{num_images} images written to {out}")


def sample_run(run_dir: str | Path, *, prompt: str = "", max_new_tokens: int = 256, temperature: float = 1.0,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               checkpoint: str = "latest", compile: bool = False, num_images: int = 4, out: str | None = None,
               device: str | None = None) -> None:
    """``tvq sample``: a text sample of a run printed as it comes, or for an image model
    ``num_images`` images written to ``out`` (default RUN_DIR/samples.png). Every option is
    checked before the model is loaded."""
    path = ckpt.find_checkpoint(run_dir, checkpoint)
    images = ckpt.load_meta(path).get("data", "").startswith("imagenet64")
    if images:
        if importlib.util.find_spec("PIL") is None:
            raise UsageError("sampling images needs pillow: pip install 'tvq[images]'")
        grid = Path(out or Path(run_dir) / "samples.png")
        if grid.suffix.lower() != ".png":
            raise UsageError(f"--out must be a .png path, got {grid}")
        check_writable_file(grid, "--out")
    elif out:
        raise UsageError("--out is for image models; a text sample is printed")
    device = check_device(device)
    model, _ = ckpt.load_model(path, device)
    if images:
        sample_images(model, grid, num_images, temperature, top_k, top_p, seed, device, compile)
        return
    run_tokenizer(run_dir, model.config.vocab_size)  # checked before anything is printed
    stream_text(model, run_dir, prompt, max_new_tokens, temperature, top_p, top_k, seed, device, compile)
