"""``tvq export`` on real tiny ``tvq train`` runs: the folder loads with the Auto classes (CPU, seconds)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tvq.cli import main  # noqa: E402
from tvq.data import ByteTokenizer, SentencePieceTokenizer  # noqa: E402
from tvq.training import checkpoint as ckpt  # noqa: E402
from conftest import ROOT, sample_text  # noqa: E402

TEXT = "ROMEO: But soft, what light through yonder window breaks? — é"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(sample_text(100_000))
    return str(path)


def train_tiny(text_file, run, *extra):
    assert main(["train", "--preset", "tiny", "--data", text_file, "--out", str(run), "--no-progress",
                 "--set", "max_steps=2", "--set", "sample_tokens=0", *extra]) == 0


@pytest.fixture(scope="module")
def byte_run(text_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "bytes"
    train_tiny(text_file, run)
    return run


def test_export_round_trip_byte_run(byte_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(byte_run), str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
            "modeling_tvq.py", "tokenization_tvq.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "transformer_vq"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}

    core, _ = ckpt.load_model(ckpt.find_checkpoint(byte_run, "latest"))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == ByteTokenizer().encode(TEXT)
    assert tokenizer.decode(ids[0]) == TEXT
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, core.eval()(ids).logits, atol=0, rtol=0)
        gen = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(gen, core.generate(ids, 10, temperature=0))


def test_export_loads_in_a_fresh_process_without_importing_tvq(byte_run, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(byte_run), str(out), "--checkpoint", "best"]) == 0
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "assert 'tvq' not in sys.modules\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"ids = t({TEXT!r}, return_tensors='pt').input_ids\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "mod"))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    core, _ = ckpt.load_model(ckpt.find_checkpoint(byte_run, "best"))
    ids = torch.tensor([ByteTokenizer().encode(TEXT)])
    with torch.no_grad():
        # another process (its own thread count): the same up to float32 rounding
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), core.eval()(ids).logits, atol=1e-5, rtol=0)


def test_export_sentencepiece_run(text_file, tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    model_file = tmp_path / "text.model"
    assert main(["data", "train-vocab", text_file, "--vocab-size", "400", "--out", str(model_file)]) == 0
    run = tmp_path / "run"
    train_tiny(text_file, run, "--set", f"tokenizer={model_file}", "--set", "model.vocab_size=400")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    assert (out / "tokenizer.model").read_bytes() == model_file.read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ours = SentencePieceTokenizer(model_file)
    ids = tokenizer(TEXT).input_ids
    assert ids == ours.encode(TEXT) and tokenizer.decode(ids) == TEXT
    assert tokenizer.bos_token_id == 0 and len(tokenizer) == 400
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    core, _ = ckpt.load_model(ckpt.find_checkpoint(run, "latest"))
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(model(x).logits, core.eval()(x).logits, atol=0, rtol=0)


def test_export_bad_input(byte_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [
        ([str(byte_run), str(out)], "already exists"),
        ([str(tmp_path / "nope"), str(tmp_path / "a")], "does not exist"),
        ([str(byte_run), str(tmp_path / "b"), "--checkpoint", "7"], "no 7 checkpoint"),
        ([str(byte_run), str(tmp_path / "c"), "--checkpoint", "newest"], "latest, best or a step number"),
    ]
    for argv, match in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tvq: error: ") and match in err[0], err
    assert (out / "keep.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_core_never_imports_transformers():
    code = ("import sys, tvq, tvq.cli, tvq.models.decoding\n"
            "assert not any(m.split('.')[0] in ('transformers', 'lm_eval') for m in sys.modules), 'imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                   timeout=120)
