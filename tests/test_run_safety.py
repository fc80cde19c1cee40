"""Run directories and checkpoints under failure: kills during saves, stale partial saves, a second
trainer, full and read-only disks, diverging losses, old and malicious train states, resumes that
would change the config, relative paths, and every file of a run corrupted in several ways."""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tvq.cli import main
from tvq.training import checkpoint as ckpt
from tvq.training import safestate
from tvq.training.config import apply_overrides, preset
from tvq.training.rundir import read_config
from tvq.training.sample import printable
from tvq.training.trainer import train
from conftest import sample_text

QUIET = dict(progress=False, log=lambda *a, **k: None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(sample_text(100_000))
    return path


def tiny(text_file, *extra):
    return apply_overrides(preset("tiny"), [f"data={text_file}", "log_every=1", "sample_tokens=0",
                                            "sequence_len=128", "update_len=32", "eval_tokens=256", *extra])


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4 (best: 4), and the uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny(text_file, "max_steps=4", "save_every=2", "eval_every=2"), root / "run", **QUIET)
    train(tiny(text_file, "max_steps=6", "save_every=2", "eval_every=2"), root / "straight", **QUIET)
    return root


def copy(trained, tmp_path, name="run") -> Path:
    return Path(shutil.copytree(trained / name, tmp_path / name))


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tvq: error: "), err
    return err[0]


def test_train_state_has_no_pickle_and_round_trips_exactly(trained):
    last = ckpt.latest_checkpoint(trained / "run")
    assert sorted(p.name for p in last.iterdir()) == ["meta.json", "model.safetensors", "train_state.json",
                                                      "train_state.safetensors"]
    ts = ckpt.load_train_state(last)
    assert ts["step"] == 4 and isinstance(ts["rng"][0]["python"], tuple)
    safestate.save(ts, last.parent / "again")
    again = safestate.load(last.parent / "again")
    (last.parent / "again.json").unlink()
    (last.parent / "again.safetensors").unlink()
    assert again["rng"][0]["numpy"][1].dtype == ts["rng"][0]["numpy"][1].dtype
    assert torch.equal(again["rng"][0]["torch"], ts["rng"][0]["torch"]) and again["rng"][0]["python"] == ts["rng"][0]["python"]
    assert torch.equal(again["states"][0].layers[0].cache_mean, ts["states"][0].layers[0].cache_mean)


def test_resume_after_a_kill_drops_the_metrics_logged_after_the_checkpoint(trained, tmp_path):
    run = copy(trained, tmp_path, "straight")
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # killed after logging steps 5, 6, before saving 6
    (run / "checkpoints" / ".tmp-step_00000006-dead").mkdir()  # ... during its save
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')  # and in the middle of a line
    train(read_config(run), run, resume=True, **QUIET)
    assert losses(run) == losses(trained / "straight")  # each step once, bit for bit
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # stale save removed


def test_a_live_trainer_holds_the_run_and_its_partial_saves_are_kept(trained, tmp_path, capsys):
    run = copy(trained, tmp_path)
    partial = run / "checkpoints" / ".tmp-step_00000006-live"
    partial.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 2
        assert "another process is training" in one_error_line(capsys)
        assert partial.is_dir()
    finally:
        holder.kill()
        holder.wait()


def test_best_survives_a_kill_at_any_moment_of_its_replacement(trained, tmp_path, monkeypatch):
    """Stop the save of a new best at each of its file operations in turn: best is always a complete
    checkpoint, the old one or the new one, before and after the next start cleans up."""
    src = copy(trained, tmp_path / "src")
    model = ckpt.load_model(ckpt.find_checkpoint(src))[0]
    ts = ckpt.load_train_state(ckpt.find_checkpoint(src))
    assert ckpt.find_checkpoint(src, "best").name == "best-step_00000004"

    class Killed(BaseException):
        pass

    n = 1
    while True:
        run = Path(shutil.copytree(src, tmp_path / f"k{n}"))
        calls = [0]

        def counting(fn):
            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == n:
                    raise Killed
                return fn(*args, **kwargs)
            return wrapped

        monkeypatch.setattr(ckpt.shutil, "copy2", counting(shutil.copy2))
        monkeypatch.setattr(ckpt.shutil, "rmtree", counting(shutil.rmtree))
        monkeypatch.setattr(Path, "rename", counting(Path.rename))
        try:
            ckpt.save_checkpoint(run, 6, model, ts, {"data": "x"}, keep_last=2, is_best=True)
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        for _ in range(2):  # as left by the kill, then after the next start's cleanup
            best = ckpt.find_checkpoint(run, "best")
            assert best.name in ("best-step_00000004", "best-step_00000006") and ckpt.load_model(best)
            assert ckpt.load_meta(best)["step"] == int(best.name[-8:])
            ckpt.clean_stale_saves(run)
        if finished:
            assert best.name == "best-step_00000006"
            break
        n += 1
    assert n > 5  # the save was stopped at every one of its operations


def test_old_pickled_train_state_still_resumes(trained, tmp_path):
    run = copy(trained, tmp_path, "straight")
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    last = run / "checkpoints" / "step_00000004"
    torch.save(ckpt.load_train_state(last), last / "train_state.pt")  # the format of older versions
    for name in ("train_state.json", "train_state.safetensors"):
        (last / name).unlink()
    train(read_config(run), run, resume=True, **QUIET)
    assert losses(run) == losses(trained / "straight")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARK}",))


EXPLOIT_MARK = Path("/tmp") / f"tvq-exploit-{os.getpid()}"


def test_a_malicious_train_state_is_refused_without_running_it(trained, tmp_path, capsys):
    run = copy(trained, tmp_path)
    last = ckpt.latest_checkpoint(run)
    for name in ("train_state.json", "train_state.safetensors"):
        (last / name).unlink()
    (last / "train_state.pt").write_bytes(pickle.dumps({"optimizer": Exploit()}))
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    assert "cannot be loaded safely" in one_error_line(capsys)
    assert not EXPLOIT_MARK.exists()


def test_non_finite_loss_stops_with_the_last_good_checkpoint(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(text_file), "--out", str(run), "--no-progress",
                 "--set", "lr=1e30", "--set", "save_every=1", "--set", "sample_tokens=5"]) == 2
    line = one_error_line(capsys)
    assert "step 2: the loss is nan" in line and "step_00000001, is intact" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    weights = ckpt.load_model(ckpt.find_checkpoint(run))[0].state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_full_disk_during_a_save_keeps_the_earlier_checkpoint(trained, tmp_path, capsys, monkeypatch):
    run = copy(trained, tmp_path)
    before = (run / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes()

    def full(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(ckpt, "save_file", full)
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "checkpoint is intact" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-step_00000004", "step_00000002",
                                                                      "step_00000004"]
    assert (run / "checkpoints" / "step_00000004" / "model.safetensors").read_bytes() == before


def test_read_only_places_are_refused_before_any_work(trained, tmp_path, capsys, monkeypatch):
    run = copy(trained, tmp_path)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).startswith(str(tmp_path)) else access(p, mode, **k))
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6"]) == 2
    assert "not writable" in one_error_line(capsys)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "new")]) == 2
    assert "not writable" in one_error_line(capsys)
    if pytest.importorskip("matplotlib"):
        assert main(["plot", str(run)]) == 2
        assert "not writable" in one_error_line(capsys)
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(run / "metrics.jsonl"))

    monkeypatch.setattr("tvq.training.rundir.os.replace", read_only)  # the metrics rewrite of a resume
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6", "--no-progress"]) == 2
    assert "Read-only file system" in one_error_line(capsys)
    assert ckpt.load_model(ckpt.find_checkpoint(run))[1]["step"] == 4


def test_a_failed_start_leaves_nothing(text_file, tmp_path, capsys, monkeypatch):
    import tvq.training.trainer as trainer

    def broken(*args):
        raise ValueError("optimizer refused")

    monkeypatch.setattr(trainer, "make_optimizer", broken)
    out = tmp_path / "a" / "b"
    assert main(["train", "--preset", "tiny", "--data", str(text_file), "--out", str(out)]) == 2
    assert "optimizer refused" in one_error_line(capsys)
    assert not (tmp_path / "a").exists()


def test_resume_refuses_changes_and_accepts_resumable_keys(trained, tmp_path, capsys):
    run = copy(trained, tmp_path)
    for extra, key in ((["--set", "lr=1e-2"], "lr"), (["--set", "model.n_code=8"], "model.n_code"),
                       (["--set", "optimizer=adafactor"], "optimizer")):
        assert main(["train", "--out", str(run), "--resume", *extra]) == 2
        assert f"--resume: {key} is" in one_error_line(capsys)
    cfg = json.loads((run / "config.json").read_text())
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--set", "grad_accum=2",
                 "--set", "log_every=2", "--set", f"data={cfg['data']}", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text()) == cfg  # the run's config file is never rewritten


def test_relative_data_path_works_from_any_folder(text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(text_file.parent)
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", text_file.name, "--out", str(run), "--no-progress",
                 "--set", "max_steps=2", "--set", "sample_tokens=0"]) == 0
    assert json.loads((run / "config.json").read_text())["data"] == str(text_file)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(run), "--max-tokens", "64", "--no-progress"]) == 0
    assert main(["train", "--out", "run", "--resume", "--max-steps", "3", "--no-progress"]) == 0


def test_eval_shows_progress_and_sample_prints_safely(trained, tmp_path, capsys):
    assert main(["eval", str(trained / "run"), "--max-tokens", "64"]) == 0
    assert "evaluating" in capsys.readouterr().err
    assert printable("a\x1b[31mb\x07\r\u202e\n\tz") == "a\\x1b[31mb\\x07\\x0d\\u202e\n\tz"
    assert main(["sample", str(trained / "run"), "--prompt", "\x1b]0;x\x07", "--max-new-tokens", "50",
                 "--temperature", "5", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\\x1b]0;x\\x07") and not any(c < " " and c not in "\n\t" for c in out)


def test_threads(trained, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(trained / "run"), "--resume", "--threads", "1", "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_train_vocab_without_sentencepiece_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else find(name, *a))
    assert main(["data", "train-vocab", "stdlib", "--vocab-size", "300"]) == 2
    assert "pip install 'tvq[sentencepiece]'" in one_error_line(capsys)


# ------------------------------------------------------------------ corrupting every file of a run
JSON_KEYS = {"config.json": ("model", "update_len"), "meta.json": ("step", "config"),
             "train_state.json": ("format", "state")}


def _json_variants(path: Path, good: bytes) -> list[bytes]:
    d = json.loads(good)
    out = [b"[1, 2]", b'"text"', b"null"]
    if isinstance(d, dict):
        for key in JSON_KEYS[path.name]:
            out.append(json.dumps({k: v for k, v in d.items() if k != key}).encode())  # a key missing
            out.append(json.dumps(dict(d, **{key: "x"})).encode())  # a value of the wrong type
    if path.name == "train_state.json":  # damage inside the state: each part the resume reads
        for key, bad in (("rng", [{"dict": []}]), ("optimizer", {"dict": [["state", {"dict": []}]]}),
                         ("states", [])):
            state = json.loads(good)
            state["state"]["dict"] = [[k, bad if k == key else v] for k, v in state["state"]["dict"]]
            out.append(json.dumps(state).encode())
    return out


def _corruptions(path: Path) -> list:
    """(name, bytes or None for deleted) for one file."""
    good = path.read_bytes()
    out = [("deleted", None), ("empty", b""), ("zeroed", bytes(len(good))), ("truncated", good[: len(good) // 2]),
           ("garbage", bytes(range(256)) * 4)]
    if path.suffix == ".json":
        out += [(f"json-{i}", v) for i, v in enumerate(_json_variants(path, good))]
    return out


RUN_FILES = ["config.json", "metrics.jsonl", "tokenizer.model", "checkpoints/step_00000004/meta.json",
             "checkpoints/step_00000004/model.safetensors", "checkpoints/step_00000004/train_state.json",
             "checkpoints/step_00000004/train_state.safetensors"]


@pytest.mark.parametrize("name", RUN_FILES)
def test_every_file_of_a_run_corrupted_in_several_ways(trained, tmp_path, capsys, name):
    """Each command on a damaged run either works or refuses in one line (exit 2); never a traceback,
    and a refusal changes no other file of the run."""
    pristine = copy(trained, tmp_path / "pristine")
    if name == "tokenizer.model":  # a byte-level run has none: a stray (damaged) one is what is tested
        (pristine / name).write_bytes(b"\x00" * 64)
    commands = [["eval", "{run}", "--max-tokens", "32", "--no-progress"],
                ["sample", "{run}", "--max-new-tokens", "2", "--seed", "0"],
                ["train", "--out", "{run}", "--resume", "--max-steps", "4", "--no-progress"]]
    if name == "metrics.jsonl":
        commands.append(["plot", "{run}", "--out", "{run}/c.png"])
    for i, (kind, data) in enumerate(_corruptions(pristine / name)):
        run = Path(shutil.copytree(pristine, tmp_path / f"c{i}"))
        if data is None:
            (run / name).unlink()
        else:
            (run / name).write_bytes(data)
        for command in commands:
            if command[0] == "plot" and not pytest.importorskip("matplotlib"):
                continue
            files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in (".lock", name)}
            rc = main([a.replace("{run}", str(run)) for a in command])
            captured = capsys.readouterr()
            assert rc in (0, 2), (kind, command)
            if rc == 2:
                err = captured.err.strip().splitlines()
                assert len(err) == 1 and err[0].startswith("tvq: error: "), (kind, command, err)
                assert {p: p.read_bytes() for p in files} == files, (kind, command)
        shutil.rmtree(run)


def test_a_sentencepiece_run_without_its_tokenizer_is_named(tmp_path):
    from tvq.training.rundir import run_tokenizer

    with pytest.raises(ValueError, match="tokenizer.model is missing: the run's model has a 400-piece vocabulary"):
        run_tokenizer(tmp_path, 400)
    assert run_tokenizer(tmp_path, 256) is None  # a byte-level run needs none


@pytest.mark.parametrize("overrides", [dict(), dict(attention="full"), dict(n_head=2, tie_embeddings=True),
                                       dict(head_type="mha"), dict(head_type="mqa"), dict(head_type="mqa", d_ff=48)])
def test_memory_estimate_is_a_lower_bound_of_the_real_model(overrides):
    """The up-front estimate may refuse only what could never have run: its counts never exceed the model's."""
    from tvq import TransformerVQ
    from tvq.training.memory import model_elements
    from conftest import tiny_config

    cfg = tiny_config(**overrides)
    model = TransformerVQ(cfg)
    params, codebooks = model_elements(cfg)
    real_codebooks = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("c_sum", "c_count")))
    assert 0.9 * model.num_parameters() <= params <= model.num_parameters()
    assert codebooks == real_codebooks


# ------------------------------------------------------------------ the commands' library functions, called directly

def test_config_from_options_resolves_new_and_resumed_runs(trained, tmp_path):
    from tvq.training.rundir import config_from_options

    cfg, run_dir = config_from_options(preset_name="tiny", data="stdlib", max_steps=3, out=str(tmp_path / "new"))
    assert run_dir == tmp_path / "new" and (cfg.data, cfg.max_steps) == ("stdlib", 3) and not run_dir.exists()
    run = copy(trained, tmp_path)
    resumed, _ = config_from_options(out=str(run), resume=True, max_steps=9, overrides=["log_every=3"])
    assert resumed.to_dict() == dict(read_config(run).to_dict(), max_steps=9, log_every=3)
    with pytest.raises(ValueError, match="--resume: lr is"):
        config_from_options(out=str(run), resume=True, overrides=["lr=1e-2"])
    with pytest.raises(ValueError, match="already holds a run"):
        config_from_options(preset_name="tiny", out=str(run))
    with pytest.raises(ValueError, match="--max-steps 3 and --set max_steps=4 disagree"):
        config_from_options(max_steps=3, overrides=["max_steps=4"], out=str(tmp_path / "other"))


def test_evaluate_and_sample_a_run_directly(trained, capsys):
    from tvq.training.evaluate import evaluate_run
    from tvq.training.sample import sample_run

    result = evaluate_run(trained / "run", checkpoint="2", max_tokens=64)
    assert (result["tokens"], result["step"], result["split"]) == (64, 2, "validation")
    sample_run(trained / "run", prompt="ab", max_new_tokens=5, temperature=0)
    out = capsys.readouterr().out
    assert out.startswith("ab") and out.endswith("\n")
    with pytest.raises(ValueError, match="--out is for image models"):
        sample_run(trained / "run", out="x.png")
