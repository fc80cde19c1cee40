"""Tests of the data layer: tokenizers, corpus sources and their splits (CPU, no network)."""

import hashlib
import sys
import sysconfig
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tvq.data import (
    SPLITS,
    ByteTokenizer,
    Corpus,
    Split,
    assign_splits,
    count_words,
    image_to_tokens,
    load_corpus,
    load_enwik8,
    save_image_grid,
    token_dtype,
    tokens_to_image,
)
from tvq.data import enwik8 as enwik8_module
from tvq.data.textfiles import STDLIB_EXCLUDED_DIRS, stdlib_files
from conftest import sample_text


def split_documents(split: Split) -> list[bytes]:
    return [split.document(i).tobytes() for i in range(split.n_docs)]


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Hello, wörld! 中文 \n\t🙂"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.vocab_size == 256 and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint8)) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text
    assert tok.decode([]) == ""
    assert tok.decode(i for i in ids) == text
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor(ids)) == text


def test_byte_tokenizer_decode_errors():
    tok = ByteTokenizer()
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # cut multi-byte character -> replacement, no exception
    with pytest.raises(ValueError, match="range|lie in"):
        tok.decode([65, 256])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_byte_tokenizer_keeps_invalid_utf8_in_documents():
    raw = b"ok \xff\xfe bytes"
    (tokens,) = ByteTokenizer().encode_documents([raw])
    assert tokens.tobytes() == raw


def test_token_dtype():
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_count_words_matches_bytes_split():
    for raw in [b"", b"   ", b"one", b" two  words\n", b"a\tb\x0bc\x0cd\re\nf", b"\xc3\xa9t\xc3\xa9  caf\xc3\xa9\xa0x"]:
        assert count_words(raw) == len(raw.split()), raw
    raw = sample_text()
    assert count_words(raw) == len(raw.split())


def test_sentencepiece_missing_gives_install_hint(monkeypatch, tmp_path):
    from tvq.data import SentencePieceTokenizer

    model = tmp_path / "m.model"
    model.write_bytes(b"not a model")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ImportError, match=r"pip install tvq\[sentencepiece\]"):
        SentencePieceTokenizer(model)


# ---------------------------------------------------------------- stdlib


@pytest.fixture(scope="module")
def stdlib_corpus() -> Corpus:
    return load_corpus("stdlib")


def test_stdlib_files_exclude_tests_and_site_packages():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert all(f.endswith(".py") for f in files)
    assert not any(set(Path(f).parts) & STDLIB_EXCLUDED_DIRS for f in files)
    assert "os.py" in files and "json/__init__.py" in files


def test_stdlib_corpus_splits_by_file(stdlib_corpus):
    corpus = stdlib_corpus
    assert corpus.vocab_size == 256 and isinstance(corpus.tokenizer, ByteTokenizer)
    root = Path(sysconfig.get_paths()["stdlib"])
    assignment = assign_splits(stdlib_files())
    seen: set[str] = set()
    for name in SPLITS:
        files = assignment[name]
        assert files, name
        assert not seen & set(files)  # disjoint by file
        seen |= set(files)
        split = corpus.split(name)
        assert split.tokens.dtype == np.uint8 and split.doc_starts.dtype == np.int64
        contents = [(root / f).read_bytes() for f in files]
        # every non-empty file is one document, in sorted order, bytes exact
        assert split_documents(split) == [c for c in contents if c]
        assert split.n_bytes == len(split.tokens) == sum(map(len, contents))
        assert split.n_words == sum(len(c.split()) for c in contents)
    assert seen == set(stdlib_files())
    n_train = len(assignment["train"])
    assert 0.8 < n_train / len(seen) < 0.97  # ~90% of files train


def test_stdlib_corpus_deterministic(stdlib_corpus):
    again = load_corpus("stdlib")
    for name in SPLITS:
        np.testing.assert_array_equal(again.split(name).tokens, stdlib_corpus.split(name).tokens)
        np.testing.assert_array_equal(again.split(name).doc_starts, stdlib_corpus.split(name).doc_starts)


def test_stdlib_bytes_round_trip(stdlib_corpus):
    split = stdlib_corpus.split("validation")
    doc = split.document(0)
    text = stdlib_corpus.tokenizer.decode(doc)
    assert stdlib_corpus.tokenizer.encode(text) == doc.tolist()


def test_split_errors(stdlib_corpus):
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        stdlib_corpus.split("valid")
    with pytest.raises(ValueError, match="out of range"):
        stdlib_corpus.split("test").document(10**6)


# ---------------------------------------------------------------- split assignment


def test_assign_splits_is_per_file_and_stable():
    files = [f"dir/file_{i}.txt" for i in range(200)]
    full = assign_splits(files)
    subset = assign_splits(files[:150])
    for name in SPLITS:
        assert set(subset[name]) == set(full[name]) & set(files[:150])  # a file's split ignores the other files
    assert sorted(sum(full.values(), [])) == sorted(files)


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_assign_splits_guarantees_nonempty_splits(n):
    files = [f"f{i}" for i in range(n)]
    splits = assign_splits(files)
    assert all(splits[name] for name in SPLITS)
    assert sorted(sum(splits.values(), [])) == sorted(files)
    assert splits == assign_splits(files)


def test_assign_splits_needs_three_files():
    with pytest.raises(ValueError, match="at least 3 files"):
        assign_splits(["a", "b"])


# ---------------------------------------------------------------- text file and folder


def test_text_file_90_5_5(tmp_path):
    raw = sample_text()
    (tmp_path / "text.txt").write_bytes(raw)
    corpus = load_corpus(str(tmp_path / "text.txt"))
    n = len(raw)
    n_train, n_validation = n * 90 // 100, n * 5 // 100
    assert corpus.name == "text.txt"
    assert corpus.split("train").tokens.tobytes() == raw[:n_train]
    assert corpus.split("validation").tokens.tobytes() == raw[n_train : n_train + n_validation]
    assert corpus.split("test").tokens.tobytes() == raw[n_train + n_validation :]
    for name in SPLITS:
        split = corpus.split(name)
        assert split.n_docs == 1 and split.n_bytes == len(split.tokens)
        assert split.n_words == len(split.tokens.tobytes().split())


def test_text_file_too_small(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    with pytest.raises(ValueError, match="at least 20"):
        load_corpus(str(small))


def test_text_folder_split_by_file(tmp_path):
    contents = {}
    for i in range(40):
        suffix = [".txt", ".md", ".py", ".rst", ".text", ""][i % 6]
        rel = f"sub{i % 3}/doc{i:02d}{suffix}"
        contents[rel] = f"document {i} " * (i + 1)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(contents[rel])
    (tmp_path / "image.bin").write_bytes(b"\x00\x01")  # not a text suffix
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    corpus = load_corpus(str(tmp_path))
    expected = assign_splits(sorted(contents))
    for name in SPLITS:
        assert split_documents(corpus.split(name)) == [contents[rel].encode() for rel in expected[name]]
    total = sum(corpus.split(name).n_docs for name in SPLITS)
    assert total == 40


def test_text_folder_with_split_subfolders(tmp_path):
    for name, texts in {"train": ["a b c", "d e"], "validation": ["v w"], "test": ["t"]}.items():
        (tmp_path / name).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / name / f"{i}.txt").write_text(text)
    corpus = load_corpus(str(tmp_path))
    assert split_documents(corpus.split("train")) == [b"a b c", b"d e"]
    assert corpus.split("train").doc_starts.tolist() == [0, 5]
    assert corpus.split("train").n_words == 5
    assert split_documents(corpus.split("validation")) == [b"v w"]
    assert split_documents(corpus.split("test")) == [b"t"]


def test_text_folder_empty_split_errors_on_access(tmp_path):
    for name in SPLITS:
        (tmp_path / name).mkdir()
    (tmp_path / "train" / "a.txt").write_text("some text")
    corpus = load_corpus(tmp_path)  # a Path works as well as a str
    assert corpus.split("train").n_docs == 1
    with pytest.raises(ValueError, match="split 'test' .* is empty"):
        corpus.split("test")


def test_text_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(str(tmp_path))
    (tmp_path / "validation").mkdir()
    with pytest.raises(ValueError, match="no train/"):
        load_corpus(str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no text files in .*train"):
        load_corpus(str(tmp_path))


def test_text_folder_without_test_split(tmp_path):
    for name in ("train", "validation"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text(f"{name} text")
    corpus = load_corpus(str(tmp_path))
    assert corpus.split("validation").n_docs == 1
    with pytest.raises(ValueError, match="split 'test' .* is empty"):
        corpus.split("test")


def test_unknown_source_and_missing_path(tmp_path):
    for source in ["wikitext103", str(tmp_path / "missing.txt")]:
        with pytest.raises(
            FileNotFoundError, match="stdlib, a text file, a folder of text files, enwik8, pg19:DIR, imagenet64:DIR"
        ):
            load_corpus(source)
    with pytest.raises(ValueError, match="names no folder"):
        load_corpus("pg19:")
    with pytest.raises(FileNotFoundError, match="PG-19 folder"):
        load_corpus(f"pg19:{tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="ImageNet64 folder"):
        load_corpus(f"imagenet64:{tmp_path / 'nope'}")


# ---------------------------------------------------------------- enwik8


def make_fake_enwik8(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", data)
    return directory / "enwik8.zip"


def test_enwik8_constants():
    assert enwik8_module.ENWIK8_SIZE == 100_000_000
    assert enwik8_module.ENWIK8_URL == "http://mattmahoney.net/dc/enwik8.zip"
    # the standard split of the real file: 90M / 5M / 5M bytes
    from tvq.data.corpus import split_90_5_5

    assert split_90_5_5(enwik8_module.ENWIK8_SIZE) == (90_000_000, 5_000_000, 5_000_000)


def test_enwik8_split_and_verification(tmp_path):
    data = bytes(range(256)) * 4 + b"<page> some words here </page>\n" * 10  # 1344 bytes
    make_fake_enwik8(tmp_path, data)
    md5 = hashlib.md5(data).hexdigest()
    corpus = load_enwik8(tmp_path, expected_size=len(data), expected_md5=md5)
    n_train, n_validation = len(data) * 90 // 100, len(data) * 5 // 100
    assert corpus.split("train").tokens.tobytes() == data[:n_train]
    assert corpus.split("validation").tokens.tobytes() == data[n_train : n_train + n_validation]
    assert corpus.split("test").tokens.tobytes() == data[n_train + n_validation :]
    assert all(corpus.split(name).n_docs == 1 for name in SPLITS)
    with pytest.raises(ValueError, match="md5"):
        load_enwik8(tmp_path, expected_size=len(data), expected_md5="0" * 32)
    with pytest.raises(ValueError, match="expected 100000000 "):
        load_enwik8(tmp_path)  # the real checks reject the fake file


def test_enwik8_bad_zip(tmp_path):
    (tmp_path / "enwik8.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="delete it"):
        load_enwik8(tmp_path)


def test_enwik8_offline_says_where_to_put_the_zip(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(enwik8_module.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as info:
        load_corpus("enwik8", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cache" / "enwik8.zip") in str(info.value)
    assert "by hand" in str(info.value)
    assert not list((tmp_path / "cache").iterdir())  # no partial download left behind


def test_enwik8_download_from_url(tmp_path):
    data = b"x y z " * 10
    source = make_fake_enwik8(tmp_path / "mirror", data)
    corpus = load_enwik8(
        tmp_path / "cache", url=source.as_uri(), expected_size=len(data), expected_md5=hashlib.md5(data).hexdigest()
    )
    assert (tmp_path / "cache" / "enwik8.zip").read_bytes() == source.read_bytes()
    assert b"".join(corpus.split(name).tokens.tobytes() for name in SPLITS) == data


# ---------------------------------------------------------------- PG-19 (SentencePiece)


@pytest.fixture(scope="module")
def pg19_dir(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    raw = sample_text(118_000)
    root = tmp_path_factory.mktemp("pg19")
    books = {
        "train": [raw[:30_000], raw[30_000:60_000], raw[60_000:100_000]],
        "validation": [raw[100_000:110_000]],
        "test": [raw[110_000:115_000], raw[115_000:118_000]],
    }
    for name, texts in books.items():
        (root / name).mkdir()
        for i, text in enumerate(texts):
            (root / name / f"{1000 + i}.txt").write_bytes(text)
    return root, books


def test_sentencepiece_train_round_trip_deterministic(tmp_path):
    pytest.importorskip("sentencepiece")
    from tvq.data import train_sentencepiece

    corpus_file = tmp_path / "text.txt"
    corpus_file.write_bytes(sample_text(100_000))
    tok = train_sentencepiece([corpus_file], tmp_path / "a", 400, max_sentences=2000)
    again = train_sentencepiece([corpus_file], tmp_path / "b", 400, max_sentences=2000)
    # same pieces and scores (the .model file itself also records the output prefix)
    assert (tmp_path / "a.vocab").read_bytes() == (tmp_path / "b.vocab").read_bytes()
    assert tok.vocab_size == 400
    text = "  First Citizen:\nBefore we proceed, é 中文 🙂\t\n\n"
    ids = tok.encode(text)
    assert again.encode(text) == ids
    assert all(0 <= i < 400 for i in ids)
    assert tok.decode(ids) == text  # lossless: byte fallback, identity normalization
    with pytest.raises(ValueError, match="lie in"):
        tok.decode([400])
    bpe = train_sentencepiece([corpus_file], tmp_path / "bpe", 400, model_type="bpe", max_sentences=2000)
    assert bpe.decode(bpe.encode(text)) == text
    with pytest.raises(ValueError, match="must exceed 259"):
        train_sentencepiece([corpus_file], tmp_path / "c", 100)
    with pytest.raises(ValueError, match="SentencePiece training failed"):
        train_sentencepiece([corpus_file], tmp_path / "c", 270)  # fewer pieces than the text's characters need
    with pytest.raises(FileNotFoundError):
        train_sentencepiece([tmp_path / "missing.txt"], tmp_path / "d", 300)


def test_pg19_requires_a_vocabulary(pg19_dir, tmp_path):
    root, _ = pg19_dir
    with pytest.raises(ValueError, match=r"tvq data train-vocab pg19:"):
        load_corpus(f"pg19:{root}", cache_dir=tmp_path)


def test_pg19_layout_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="validation/, test/"):
        load_corpus(f"pg19:{tmp_path}", cache_dir=tmp_path / "cache")


def test_pg19_train_vocab_and_load(pg19_dir, tmp_path):
    from tvq.data import PG19_VOCAB_FILE, SentencePieceTokenizer, train_pg19_vocab

    root, books = pg19_dir
    out = tmp_path / "vocab" / PG19_VOCAB_FILE
    assert train_pg19_vocab(root, vocab_size=420, output=out, max_sentences=3000) == out
    tok = SentencePieceTokenizer(out)
    assert tok.vocab_size == 420
    corpus = load_corpus(f"pg19:{root}", cache_dir=tmp_path / "cache", tokenizer=tok)
    assert corpus.name == "pg19" and corpus.vocab_size == 420
    for name in SPLITS:
        split = corpus.split(name)
        assert split.tokens.dtype == np.uint16
        assert split.n_docs == len(books[name])
        assert [tok.decode(split.document(i)) for i in range(split.n_docs)] == [b.decode() for b in books[name]]
        assert split.n_bytes == sum(map(len, books[name]))
        assert split.n_words == sum(len(b.split()) for b in books[name])
        assert len(split.tokens) < split.n_bytes  # subword tokens compress
    cached = load_corpus(f"pg19:{root}", cache_dir=tmp_path / "cache", tokenizer=SentencePieceTokenizer(out))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # same books + model: one cache entry, reused
    for name in SPLITS:
        np.testing.assert_array_equal(cached.split(name).tokens, corpus.split(name).tokens)
        assert cached.split(name).n_words == corpus.split(name).n_words


def test_pg19_default_vocab_file(pg19_dir, tmp_path):
    from tvq.data import PG19_VOCAB_FILE, train_pg19_vocab

    root, books = pg19_dir
    assert train_pg19_vocab(root, vocab_size=400, max_sentences=2000) == root / PG19_VOCAB_FILE
    try:
        corpus = load_corpus(f"pg19:{root}", cache_dir=tmp_path)
        assert corpus.vocab_size == 400
        assert corpus.tokenizer.decode(corpus.split("validation").tokens) == books["validation"][0].decode()
    finally:
        (root / PG19_VOCAB_FILE).unlink()
        (root / PG19_VOCAB_FILE).with_suffix(".vocab").unlink()


# ---------------------------------------------------------------- ImageNet64


def pixel_values(n: int, offset: int) -> np.ndarray:
    """(n, 64, 64, 3) images whose every subpixel encodes (image, y, x, channel)."""
    i, y, x, c = np.meshgrid(np.arange(n) + offset, np.arange(64), np.arange(64), np.arange(3), indexing="ij")
    return ((i * 31 + y * 7 + x * 3 + c * 101) % 256).astype(np.uint8)


def to_planar(images: np.ndarray) -> np.ndarray:
    """The official npz layout: per image, the R plane, then G, then B, each 64x64 row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 12288)


def test_image_tokens_raster_order_channels_interleaved():
    image = pixel_values(1, 0)[0]
    tokens = image_to_tokens(image)
    for y, x, c in [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (1, 0, 2), (63, 63, 2)]:
        assert tokens[(y * 64 + x) * 3 + c] == image[y, x, c]
    np.testing.assert_array_equal(tokens_to_image(tokens.astype(np.int64)), image)
    with pytest.raises(ValueError):
        tokens_to_image(np.full(12288, 256))
    with pytest.raises(ValueError):
        tokens_to_image(np.zeros(100, dtype=np.int64))


def test_imagenet64_npz(tmp_path):
    sizes = {1: 5, 2: 4, 10: 3}  # batch 10 sorts after batch 2
    offset, train_images = 0, []
    for batch, n in sizes.items():
        images = pixel_values(n, offset)
        offset += n
        train_images.append(images)
        np.savez(tmp_path / f"train_data_batch_{batch}.npz", data=to_planar(images), labels=np.ones(n, dtype=np.int64))
    train_images = np.concatenate(train_images)  # 12 images
    val_images = pixel_values(2, 1000)
    np.savez(tmp_path / "val_data.npz", data=to_planar(val_images), labels=np.ones(2, dtype=np.int64))

    corpus = load_corpus(f"imagenet64:{tmp_path}", cache_dir=tmp_path / "cache")
    assert corpus.vocab_size == 256
    train, validation, test = (corpus.split(name) for name in SPLITS)
    assert (train.n_docs, validation.n_docs, test.n_docs) == (11, 1, 2)  # 10% of 12 -> 1 validation image
    assert train.doc_starts.tolist() == [12288 * i for i in range(11)]
    tokens = train.document(3)
    assert (
        tokens[0] == train_images[3, 0, 0, 0]
        and tokens[1] == train_images[3, 0, 0, 1]
        and tokens[2] == train_images[3, 0, 0, 2]
    )
    assert tokens[3] == train_images[3, 0, 1, 0] and tokens[64 * 3] == train_images[3, 1, 0, 0]
    for i in range(11):
        np.testing.assert_array_equal(tokens_to_image(train.document(i)), train_images[i])
    np.testing.assert_array_equal(tokens_to_image(validation.document(0)), train_images[11])
    for i in range(2):
        np.testing.assert_array_equal(tokens_to_image(test.document(i)), val_images[i])
    assert test.n_bytes == 2 * 12288 and test.n_words == 0

    again = load_corpus(f"imagenet64:{tmp_path}", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.split("train").tokens, train.tokens)
    with pytest.raises(ValueError, match="tokenizer"):
        load_corpus(f"imagenet64:{tmp_path}", cache_dir=tmp_path / "cache", tokenizer=ByteTokenizer())


def test_imagenet64_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_corpus(f"imagenet64:{tmp_path}", cache_dir=tmp_path / "cache")
    np.savez(tmp_path / "train_data_batch_1.npz", data=to_planar(pixel_values(2, 0)))
    with pytest.raises(ValueError, match="val_data.npz"):
        load_corpus(f"imagenet64:{tmp_path}", cache_dir=tmp_path / "cache")


def test_imagenet64_png_and_image_grid(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    train_images, val_images = pixel_values(20, 0), pixel_values(3, 500)
    for folder, images in (("train_64x64", train_images), ("valid_64x64", val_images)):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / folder / f"{i:05d}.png")
    corpus = load_corpus(f"imagenet64:{tmp_path}", cache_dir=tmp_path / "cache")
    train, validation, test = (corpus.split(name) for name in SPLITS)
    assert (train.n_docs, validation.n_docs, test.n_docs) == (18, 2, 3)
    np.testing.assert_array_equal(train.tokens.reshape(18, 64, 64, 3), train_images[:18])
    np.testing.assert_array_equal(validation.tokens.reshape(2, 64, 64, 3), train_images[18:])
    np.testing.assert_array_equal(test.tokens.reshape(3, 64, 64, 3), val_images)

    grid_path = tmp_path / "out" / "grid.png"
    save_image_grid(val_images, grid_path, columns=2, padding=1)
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    assert grid.shape == (2 * 64 + 3, 2 * 64 + 3, 3)
    np.testing.assert_array_equal(grid[1:65, 66:130], val_images[1])
    np.testing.assert_array_equal(grid[66:130, 1:65], val_images[2])
    assert not grid[66:130, 66:130].any()  # empty cell stays black


def test_save_image_grid_without_pillow_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install tvq\[images\]"):
        save_image_grid(pixel_values(1, 0), tmp_path / "grid.png")
    with pytest.raises(ValueError, match="uint8 images"):
        save_image_grid(np.zeros((2, 64, 64), dtype=np.uint8), tmp_path / "grid.png")


def test_source_info_has_a_line_per_split(tmp_path):
    from tvq.data import source_info

    raw = sample_text()
    (tmp_path / "text.txt").write_bytes(raw)
    lines = source_info(str(tmp_path / "text.txt"))
    assert [line.split(":")[0] for line in lines] == list(SPLITS)
    assert lines[0] == f"train: {len(raw) * 90 // 100:,} tokens, 1 documents, {len(raw) * 90 // 100:,} bytes"


def test_train_vocab_refuses_before_training(tmp_path):
    pytest.importorskip("sentencepiece")
    from tvq.data import train_vocab

    with pytest.raises(ValueError, match="needs a text source"):
        train_vocab("imagenet64:x")
    with pytest.raises(ValueError, match="must end in .model"):
        train_vocab("stdlib", 300, str(tmp_path / "v.txt"))
    with pytest.raises(ValueError, match="does not exist"):
        train_vocab("stdlib", 300, str(tmp_path / "no" / "v.model"))
