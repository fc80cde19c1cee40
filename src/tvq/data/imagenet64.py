"""Downsampled ImageNet 64x64 as byte sequences: each image is one document of 64*64*3 = 12288 tokens.

Tokens are the subpixel values (vocab 256) in raster order with channels interleaved: pixel
(0, 0) R, G, B, then pixel (0, 1) R, G, B, and so on. DIR holds either

- the official `.npz` batches, `train_data_batch_1.npz` ... and `val_data.npz`, whose key `data`
  is (N, 12288) uint8 stored as three 64x64 row-major planes R, G, B; or
- PNG files (64x64 RGB; needs Pillow): training images in `train_64x64/` or `train/`, held-out
  images in `valid_64x64/`, `val/` or `validation/`.

Splits: the last `n_validation` training images (10,000, or 10% of train when smaller) are
"validation"; the official validation set is "test" (the set the paper reports on).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tvq.data.cache import cached_splits, fingerprint, resolve_cache_dir
from tvq.data.corpus import Corpus, Split
from tvq.data.tokenizer import ByteTokenizer

IMAGE_SIZE = 64
CHANNELS = 3
TOKENS_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE * CHANNELS  # 12288
N_VALIDATION = 10_000
TRAIN_PNG_DIRS = ("train_64x64", "train")
HELD_OUT_PNG_DIRS = ("valid_64x64", "val", "validation")
_TRAIN_BATCH = re.compile(r"train_data_batch_(\d+)\.npz")


def _import_pil():
    """Pillow's Image module, or an ImportError saying how to install it."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("PNG images need the optional package Pillow; run `pip install tvq[images]`") from err
    return Image


def planar_to_tokens(data: np.ndarray) -> np.ndarray:
    """(N, 12288) uint8 rows of R, G, B planes (the npz layout) -> (N, 12288) raster order, channels interleaved."""
    if data.ndim != 2 or data.shape[1] != TOKENS_PER_IMAGE or data.dtype != np.uint8:
        raise ValueError(
            f"ImageNet64 data must be (N, {TOKENS_PER_IMAGE}) uint8, got {data.shape} {data.dtype}; "
            "use the official 64x64 npz batches"
        )
    planes = data.reshape(len(data), CHANNELS, IMAGE_SIZE, IMAGE_SIZE)  # (N, C, H, W)
    return planes.transpose(0, 2, 3, 1).reshape(len(data), TOKENS_PER_IMAGE)  # (N, H*W*C)


def image_to_tokens(image: np.ndarray) -> np.ndarray:
    """(64, 64, 3) uint8 image -> (12288,) uint8 tokens in raster order, channels interleaved."""
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, CHANNELS) or image.dtype != np.uint8:
        raise ValueError(
            f"expected a ({IMAGE_SIZE}, {IMAGE_SIZE}, {CHANNELS}) uint8 RGB image, got {image.shape} {image.dtype}; "
            "resize or convert it first"
        )
    return image.reshape(TOKENS_PER_IMAGE)


def tokens_to_image(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """(12288,) token ids in [0, 256) -> (64, 64, 3) uint8 image; the inverse of image_to_tokens."""
    tokens = np.asarray(tokens)
    if tokens.shape != (TOKENS_PER_IMAGE,) or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"expected {TOKENS_PER_IMAGE} integer tokens (one 64x64 RGB image), got shape {tokens.shape} dtype "
            f"{tokens.dtype}"
        )
    if tokens.min() < 0 or tokens.max() > 255:
        raise ValueError(f"image tokens must lie in [0, 256), got values in [{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, CHANNELS)


def save_image_grid(
    images: Sequence[np.ndarray] | np.ndarray, path: str | Path, *, columns: int | None = None, padding: int = 2
) -> None:
    """Save (H, W, 3) uint8 images as one PNG grid, `columns` wide (default ~square), `padding` black pixels apart."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] != CHANNELS or images.dtype != np.uint8:
        raise ValueError(
            f"expected a non-empty stack of (H, W, 3) uint8 images, got {images.shape} {images.dtype}; "
            "convert tokens with tokens_to_image"
        )
    n, h, w, _ = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    if columns < 1 or padding < 0:
        raise ValueError(f"columns must be positive and padding non-negative, got {columns} and {padding}")
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h + (rows + 1) * padding, columns * w + (columns + 1) * padding, CHANNELS), dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[top : top + h, left : left + w] = image
    image_module = _import_pil()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_module.fromarray(grid).save(path, format="PNG")


def _read_npz(path: Path) -> np.ndarray:
    """(N, 12288) uint8 tokens of one official npz batch."""
    with np.load(path) as npz:
        if "data" not in npz:
            raise ValueError(f"{path} has no 'data' array; use the official ImageNet64 npz batches")
        return planar_to_tokens(npz["data"])


def _read_pngs(paths: Sequence[Path]) -> np.ndarray:
    """(N, 12288) uint8 tokens of 64x64 PNG files."""
    image_module = _import_pil()
    tokens = np.empty((len(paths), TOKENS_PER_IMAGE), dtype=np.uint8)
    for i, p in enumerate(paths):
        with image_module.open(p) as image:
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(
                    f"{p} is {image.size[0]}x{image.size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}; "
                    "use the downsampled 64x64 ImageNet"
                )
            tokens[i] = image_to_tokens(np.asarray(image.convert("RGB")))
    return tokens


def _sources(directory: Path) -> tuple[list[Path], list[Path], bool]:
    """(train files, held-out files, whether they are npz batches) found in `directory`."""
    batches = [
        (int(m.group(1)), p) for p in directory.glob("train_data_batch_*.npz") if (m := _TRAIN_BATCH.fullmatch(p.name))
    ]
    if batches or (directory / "val_data.npz").is_file():
        if not batches or not (directory / "val_data.npz").is_file():
            raise ValueError(
                f"ImageNet64 folder {directory} needs both train_data_batch_*.npz and val_data.npz; "
                "add the missing official batches"
            )
        return [p for _, p in sorted(batches)], [directory / "val_data.npz"], True
    train_dir = next((directory / d for d in TRAIN_PNG_DIRS if (directory / d).is_dir()), None)
    held_out_dir = next((directory / d for d in HELD_OUT_PNG_DIRS if (directory / d).is_dir()), None)
    if train_dir is None or held_out_dir is None:
        raise ValueError(
            f"ImageNet64 folder {directory} has neither train_data_batch_*.npz + val_data.npz nor PNG folders "
            f"({' or '.join(TRAIN_PNG_DIRS)}, and {' or '.join(HELD_OUT_PNG_DIRS)}); put the official data there"
        )
    return sorted(train_dir.glob("*.png")), sorted(held_out_dir.glob("*.png")), False


def _image_split(images: np.ndarray) -> Split:
    """Split of (N, 12288) image tokens, one document per image; n_bytes counts subpixels, n_words is 0."""
    return Split(
        images.reshape(-1), np.arange(len(images), dtype=np.int64) * TOKENS_PER_IMAGE, n_bytes=images.size, n_words=0
    )


def load_imagenet64(
    directory: str | Path, *, cache_dir: str | Path | None = None, n_validation: int = N_VALIDATION
) -> Corpus:
    """ImageNet 64x64 as a byte-level corpus (see the module docstring for layout and splits).

    Validation is the last min(n_validation, 10% of train) training images. Converted arrays
    are cached under `cache_dir` (default `~/.cache/tvq`); the full training set is ~16 GB.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"ImageNet64 folder {directory} not found; pass imagenet64:DIR with the npz batches or PNG folders"
        )
    if n_validation < 1:
        raise ValueError(f"n_validation must be positive, got {n_validation}")
    train_files, held_out_files, is_npz = _sources(directory)

    def read(files: list[Path]) -> np.ndarray:  # (N, 12288) uint8
        return np.concatenate([_read_npz(f) for f in files]) if is_npz else _read_pngs(files)

    def build():
        train = read(train_files)
        if len(train) < 2:
            raise ValueError(
                f"ImageNet64 folder {directory} has {len(train)} training images; "
                "need at least 2 to carve a validation set"
            )
        n_held = max(1, min(n_validation, len(train) // 10))
        return {
            "train": _image_split(train[:-n_held]),
            "validation": _image_split(train[-n_held:]),
            "test": _image_split(read(held_out_files)),
        }

    key = fingerprint({"source": "imagenet64", "n_validation": n_validation}, [*train_files, *held_out_files])
    splits = cached_splits(resolve_cache_dir(cache_dir) / f"imagenet64-{key}", build)
    tokenizer = ByteTokenizer()
    return Corpus(name="imagenet64", tokenizer=tokenizer, vocab_size=tokenizer.vocab_size, splits=splits)
