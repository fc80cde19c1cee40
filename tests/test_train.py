"""Training loop, checkpoints and the tvq command, on a small real text (CPU, seconds)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tvq.cli import main
from tvq.training import checkpoint as ckpt
from tvq.training.batches import SegmentSampler
from tvq.training.config import apply_overrides, preset
from tvq.schedule import lr_at
from tvq.training.trainer import train
from conftest import sample_text



@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(sample_text(200_000))
    return str(path)


def tiny(text_file, *extra):
    return apply_overrides(preset("tiny"), [f"data={text_file}", "log_every=1", *extra])


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_lr_schedule():
    def at(step):  # 100 steps, 10 of warmup, peak 1, down to 0.1
        return lr_at(step, 100, 1.0, 10, 0.1)

    assert at(0) == pytest.approx(0.1) and at(9) == pytest.approx(1.0)
    assert at(10) == pytest.approx(1.0) and at(100) == pytest.approx(0.1)
    assert at(55) == pytest.approx(0.1 + 0.9 * 0.5)


def make_split(doc_lengths=None, docs=None):
    from tvq.data.corpus import split_from_documents

    rng = np.random.default_rng(0)
    docs = docs or [rng.integers(1, 256, n).astype(np.uint8) for n in doc_lengths]
    return split_from_documents(docs, np.uint8, n_bytes=sum(map(len, docs)), n_words=0)


def test_sampler_is_deterministic_contiguous_and_inside_documents():
    cfg = apply_overrides(preset("tiny"), ["sequence_len=128", "update_len=64", "batch_size=512"])
    split = make_split([130, 50, 128, 200])  # the 50-token document can hold no sequence
    a, b = SegmentSampler(split, cfg), SegmentSampler(split, cfg)
    x0, y0 = a.batch(0)
    x1, y1 = a.batch(1)
    assert torch.equal(x0, b.batch(0)[0]) and torch.equal(y0, b.batch(0)[1])
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # inputs are labels shifted right
    assert torch.equal(x1[:, 0], y0[:, -1]) and torch.equal(x1[:, 1:], y1[:, :-1])  # segment 1 continues 0
    starts, at_doc_start = a.sequence_starts(0)
    ends = np.append(split.doc_starts, len(split.tokens))
    doc = np.searchsorted(split.doc_starts, starts, side="right") - 1
    assert np.all(starts + 128 <= ends[doc + 1])  # the whole sequence inside one document
    assert not np.any(doc == 1)
    assert torch.equal(x0[torch.from_numpy(at_doc_start), 0], torch.zeros(int(at_doc_start.sum()), dtype=torch.long))
    assert at_doc_start.any() and not at_doc_start.all()
    assert not torch.equal(a.batch(2)[1], y0)  # a new sequence
    with pytest.raises(ValueError, match="no training document"):
        SegmentSampler(make_split([100, 120]), cfg)


def test_evaluation_resets_state_at_each_document():
    """Scoring two documents in one split == scoring each alone."""
    from tvq.training.evaluate import evaluate
    from conftest import make_model

    model = make_model(vocab_size=256).eval()
    docs = make_split([70, 90])
    both, first, second = docs, make_split(docs=[docs.document(0)]), make_split(docs=[docs.document(1)])
    r = [evaluate(model, s, segment_len=32) for s in (both, first, second)]
    assert r[0]["tokens"] == 160
    assert r[0]["loss"] * 160 == pytest.approx(r[1]["loss"] * 70 + r[2]["loss"] * 90, rel=1e-12)


def test_resume_reproduces_the_uninterrupted_run(text_file, tmp_path):
    # 6 steps straight vs 3 + resume + 3; step 3 is mid-sequence, so the carried state matters
    cfg = tiny(text_file, "max_steps=6", "save_every=3", "sequence_len=128", "update_len=32")
    train(cfg, tmp_path / "straight", progress=False, log=lambda *a: None)
    first = apply_overrides(cfg, ["max_steps=3"])
    train(first, tmp_path / "split", progress=False, log=lambda *a: None)
    train(cfg, tmp_path / "split", resume=True, progress=False, log=lambda *a: None)
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert [s for s, _ in split] == [1, 2, 3, 4, 5, 6]
    assert straight == split
    again = train(cfg, tmp_path / "split", resume=True, progress=False, log=lambda *a: None)
    assert again["tokens"] > 0 and losses(tmp_path / "split") == split  # nothing left to train
    a = ckpt.load_model(ckpt.find_checkpoint(tmp_path / "straight"))[0].state_dict()
    b = ckpt.load_model(ckpt.find_checkpoint(tmp_path / "split"))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accum_matches_one_batch(text_file, tmp_path):
    cfg = tiny(text_file, "max_steps=2", "grad_accum=1")
    train(cfg, tmp_path / "one", progress=False, log=lambda *a: None)
    train(apply_overrides(cfg, ["grad_accum=2"]), tmp_path / "two", progress=False, log=lambda *a: None)
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "one"), losses(tmp_path / "two")):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)


def test_cli_train_eval_sample_end_to_end(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", text_file, "--out", str(run), "--no-progress",
                 "--set", "max_steps=12"]) == 0
    out = capsys.readouterr().out
    assert f"run saved to {run}" in out and "sample:" in out
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["best-step_00000012", "step_00000010", "step_00000012"]  # keep_last=2, plus best
    assert main(["eval", str(run), "--json", "--max-tokens", "500"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"bpb", "loss", "tokens"} <= result.keys() and result["tokens"] == 500
    assert result["bpb"] == pytest.approx(result["loss"] / math.log(2))
    assert 0 < result["bpb"] < 8.5
    assert main(["sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    main(["sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1"])
    assert first.startswith("ROMEO:") and capsys.readouterr().out == first


def test_training_lowers_validation_loss(text_file, tmp_path):
    cfg = tiny(text_file, "max_steps=40", "lr=1e-2", "eval_every=40")
    val = train(cfg, tmp_path / "r", progress=False, log=lambda *a: None)
    assert val["bpb"] < 5.0  # uniform over bytes is 8 bits; the text's unigram entropy is ~4.7


@pytest.mark.parametrize("argv,match", [
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--set", "lr"], "key=value"),
    (["train", "--set", "nonsense=1"], "unknown config key"),
    (["train", "--set", "model.d_kk=1"], "unknown model config key"),
    (["train", "--set", "lr=fast"], "type float"),
    (["train", "--preset", "tiny", "--set", "sequence_len=100"], "not divisible by update_len"),
    (["train", "--preset", "tiny", "--set", "update_len=24", "--set", "sequence_len=48"],
     "not divisible by model.block_len"),
    (["train", "--preset", "tiny", "--data", "/no/such/file.txt"], "/no/such/file.txt"),
    (["train", "--config", "/no/such/config.json"], "does not exist"),
    (["eval", "/no/such/run"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(argv, match, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tvq: error:") and match in err and "\n" not in err


def test_existing_run_is_never_overwritten(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", text_file, "--out", str(run), "--no-progress",
            "--set", "max_steps=2", "--set", "sample_tokens=0"]
    assert main(args) == 0
    before = (run / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000002" / "model.safetensors").read_bytes() == before


def test_corrupt_and_mismatched_checkpoints(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--preset", "tiny", "--data", text_file, "--out", str(run), "--no-progress",
          "--set", "max_steps=2", "--set", "sample_tokens=0"])
    weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert main(["eval", str(run)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    weights.write_bytes(good)
    meta = run / "checkpoints" / "step_00000002" / "meta.json"
    m = json.loads(meta.read_text())
    m["config"]["d_model"] = 64
    meta.write_text(json.dumps(m))
    assert main(["eval", str(run)]) == 2
    assert "does not match the model config" in capsys.readouterr().err


def test_interrupted_save_keeps_previous_checkpoint(text_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny(text_file, "max_steps=2", "save_every=1"), run, progress=False, log=lambda *a: None)
    model = ckpt.load_model(ckpt.find_checkpoint(run))[0]

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(run, 2, model, {}, {}, keep_last=2)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best-step_00000002", "step_00000001", "step_00000002"]  # no temp dir left, step 2 intact
    ckpt.load_model(run / "checkpoints" / "step_00000002")


def test_pg19_end_to_end_word_perplexity(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sentencepiece")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = sample_text(90_000)
    books = {"train": [raw[:40_000], raw[40_000:80_000]], "validation": [raw[80_000:86_000]],
             "test": [raw[86_000:90_000]]}
    for split, texts in books.items():
        (tmp_path / "pg19" / split).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "pg19" / split / f"{i}.txt").write_bytes(text)
    source = f"pg19:{tmp_path / 'pg19'}"
    assert main(["train", "--preset", "tiny", "--data", source, "--out", str(tmp_path / "x")]) == 2
    assert "tvq data train-vocab" in capsys.readouterr().err
    assert main(["data", "train-vocab", source, "--vocab-size", "400"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", source, "--out", str(run), "--no-progress",
                 "--set", "model.vocab_size=400", "--set", "max_steps=3", "--set", "sample_tokens=5"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    words = len(books["test"][0].split())
    assert result["word_ppl"] == pytest.approx(math.exp(result["loss"] * result["tokens"] / words))
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / len(books["test"][0]))
    # a byte-level run cannot be evaluated on a 400-piece vocabulary
    byte_run = tmp_path / "bytes"
    main(["train", "--preset", "tiny", "--data", str(tmp_path / "pg19"), "--out", str(byte_run),
          "--no-progress", "--set", "max_steps=1", "--set", "sample_tokens=0"])
    capsys.readouterr()
    assert main(["eval", str(byte_run), "--data", source]) == 2
    assert "vocabulary 400" in capsys.readouterr().err


def test_imagenet64_train_and_sample_png(tmp_path, capsys, monkeypatch):
    pytest.importorskip("PIL")
    from tvq.training import sample

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    (tmp_path / "in64").mkdir()
    np.savez(tmp_path / "in64" / "train_data_batch_1.npz", data=rng.integers(0, 256, (20, 12288), dtype=np.uint8))
    np.savez(tmp_path / "in64" / "val_data.npz", data=rng.integers(0, 256, (2, 12288), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", f"imagenet64:{tmp_path / 'in64'}", "--out", str(run),
                 "--no-progress", "--set", "max_steps=2", "--set", "sequence_len=12288",
                 "--set", "update_len=1536", "--set", "eval_tokens=3000"]) == 0
    capsys.readouterr()
    # sample tiny 4x4 images: the full 12288-token loop is the same code, 256x longer
    monkeypatch.setattr(sample, "TOKENS_PER_IMAGE", 48)
    monkeypatch.setattr(sample, "tokens_to_image", lambda t: t.reshape(4, 4, 3).astype(np.uint8))
    assert main(["sample", str(run), "--num-images", "3", "--seed", "0", "--top-p", "0.999"]) == 0
    assert "3 images written" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(run / "samples.png").size[0] > 4


def test_plot_writes_png(text_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    main(["train", "--preset", "tiny", "--data", text_file, "--out", str(run), "--no-progress",
          "--set", "max_steps=10", "--set", "eval_every=5", "--set", "sample_tokens=0"])
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2


def test_sentencepiece_vocabulary_for_a_text_file(text_file, tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    model_file = tmp_path / "text.model"
    assert main(["data", "train-vocab", text_file, "--vocab-size", "500", "--out", str(model_file)]) == 0
    assert f"--set tokenizer={model_file}" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", text_file, "--out", str(run), "--no-progress",
                 "--set", f"tokenizer={model_file}", "--set", "max_steps=2", "--set", "sample_tokens=8"]) == 2
    assert "--set model.vocab_size=500" in capsys.readouterr().err
    assert not run.exists()  # a run that fails its checks leaves nothing behind
    assert main(["train", "--preset", "tiny", "--data", text_file, "--out", str(run), "--no-progress",
                 "--set", f"tokenizer={model_file}", "--set", "model.vocab_size=500", "--set", "max_steps=2",
                 "--set", "sample_tokens=8"]) == 0
    assert (run / "tokenizer.model").read_bytes() == model_file.read_bytes()
    capsys.readouterr()
    model_file.unlink()  # the run keeps its own copy
    assert main(["eval", str(run), "--json", "--max-tokens", "300"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 300 and "ppl" in result
    assert main(["sample", str(run), "--prompt", "First", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("First")


def test_plot_run_draws_a_metrics_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tvq.training.plot import plot_run

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "bpb": 3.0}\nnot json\n'
                                            '{"step": 2, "loss": 1.5, "bpb": 2.0}\n{"step": 2, "val/bpb": 2.5}\n')
    assert plot_run(tmp_path) == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_run(tmp_path, tmp_path / "c.svg").read_text().startswith("<?xml")
    assert "skipped 1 damaged line(s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="image type"):
        plot_run(tmp_path, tmp_path / "c.xyz")
