"""The bad-input contract of the real ``tvq`` console script: for every case of a table, exit code 2,
exactly one stderr line ``tvq: error: ...`` naming the problem, nothing on stdout, no traceback, and
nothing in the working folder created or changed. Every case fails before any training."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tvq.training.config import apply_overrides, preset
from tvq.training.trainer import train
from conftest import ROOT, sample_text


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a text file, a tiny trained run, a plain file and bad config files."""
    root = tmp_path_factory.mktemp("work")
    (root / "text.txt").write_bytes(sample_text(60_000))
    cfg = apply_overrides(preset("tiny"), [f"data={root / 'text.txt'}", "max_steps=2", "sample_tokens=0"])
    train(cfg, root / "run", progress=False, log=lambda *a: None)
    (root / "file").write_text("not a folder")
    (root / "model5.json").write_text(json.dumps({"model": 5}))
    (root / "list.json").write_text("[1, 2]")
    (root / "broken.json").write_text("{")
    (root / "inf.json").write_text('{"lr": Infinity}')
    os.mkdir(root / "folder")
    return root


def tvq_command() -> list[str]:
    """The installed console script when it runs this checkout, else ``python -m tvq``."""
    script = shutil.which("tvq", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "tvq"]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if p.name != ".lock"}


R = "run"  # the trained run, relative to the working folder
CASES = [
    # (argv, a piece of the message)
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["train", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "--max-steps", "0"], "--max-steps"),
    (["train", "--max-steps", "abc"], "--max-steps"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--preset", "tiny", "--config", "list.json"], "not allowed with"),
    (["train", "--config", "model5.json", "--out", "new"], "model must be a JSON object"),
    (["train", "--config", "list.json", "--out", "new"], "must be a JSON object"),
    (["train", "--config", "broken.json", "--out", "new"], "not valid JSON"),
    (["train", "--config", "inf.json", "--out", "new"], "lr must be a finite number"),
    (["train", "--config", "nothere.json", "--out", "new"], "does not exist"),
    (["train", "--config", "folder", "--out", "new"], "not a file"),
    (["train", "--set", "lr=inf", "--out", "new"], "lr must be a finite number"),
    (["train", "--set", "lr=nan", "--out", "new"], "lr must be a finite number"),
    (["train", "--set", "lr=-1", "--out", "new"], "lr must be > 0"),
    (["train", "--set", "beta2=1.5", "--out", "new"], "beta2"),
    (["train", "--set", "top_p=0", "--out", "new"], "top_p"),
    (["train", "--set", "seed=1e30", "--out", "new"], "seed must be an integer (64-bit)"),
    (["train", "--set", "dist_timeout=1e12", "--out", "new"], "dist_timeout"),
    (["train", "--set", "model.attention=linear", "--out", "new"], "attention"),
    (["train", "--set", "model.dropout_res=1", "--out", "new"], "dropout_res"),
    (["train", "--set", "nonsense=1", "--out", "new"], "unknown config key"),
    (["train", "--set", "lr", "--out", "new"], "key=value"),
    (["train", "--max-steps", "5", "--set", "max_steps=6", "--out", "new"], "disagree"),
    (["train", "--data", "", "--out", "new"], "data is empty"),
    (["train", "--out", "file"], "is a file"),
    (["train", "--out", "file/sub"], "is a file, not a folder"),
    (["train", "--out", ""], "empty path"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--resume", "--out", "nothere"], "does not exist"),
    (["train", "--resume", "--out", R, "--set", "lr=1"], "--resume: lr is 0.003 in the run"),
    (["train", "--resume", "--out", R, "--set", "model.d_model=64"], "--resume: model.d_model"),
    (["train", "--resume", "--out", R, "--data", "stdlib"], "--resume: data is"),
    (["train", "--resume", "--out", R, "--preset", "small"], "--resume: data is"),
    (["train", "--preset", "tiny", "--data", "text.txt", "--out", "new", "--set", "model.d_model=1e9"],
     "needs at least"),
    (["train", "--preset", "tiny", "--data", "text.txt", "--out", "new", "--set", "batch_size=1e9"],
     "smaller batch_size"),
    (["train", "--preset", "tiny", "--data", "nothere.txt", "--out", "new"], "nothere.txt"),
    (["eval", R, "--checkpoint", "abc"], "latest, best or a step number"),
    (["eval", R, "--checkpoint", "7"], "no 7 checkpoint"),
    (["eval", R, "--max-tokens", "-5"], "--max-tokens"),
    (["eval", R, "--split", "train"], "invalid choice"),
    (["eval", R, "--device", "tpu"], "unknown device"),
    (["eval", R, "--data", ""], "--data is empty"),
    (["eval", "nothere"], "does not exist"),
    (["eval", "file"], "is not a run directory"),
    (["sample", R, "--temperature", "nan"], "--temperature"),
    (["sample", R, "--temperature", "-1"], "--temperature"),
    (["sample", R, "--top-p", "2", "--max-new-tokens", "0"], "--top-p"),
    (["sample", R, "--max-new-tokens", "0"], "--max-new-tokens"),
    (["sample", R, "--top-k", "0"], "--top-k"),
    (["sample", R, "--seed", "-1"], "--seed"),
    (["sample", R, "--seed", "1e30"], "--seed"),
    (["sample", R, "--num-images", "0"], "--num-images"),
    (["sample", R, "--out", "x.png"], "--out is for image models"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--batch-size", "0"], "--batch-size"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--decode-steps", "0"], "--decode-steps"),
    (["bench", "--time-budget", "0"], "--time-budget"),
    (["bench", "--time-budget", "nan"], "--time-budget"),
    (["bench", "--device", "tpu"], "unknown device"),
    (["bench", "--json", "nothere/b.json"], "--json"),
    (["bench", "--json", "folder"], "is a folder"),
    (["bench", "--impl", "flash"], "unknown mode/impl"),
    (["bench", "--seq-lens", "0"], "--seq-lens"),
    (["bench", "--processes", "0"], "--processes"),
    (["bench", "--dtype", "float16"], "invalid choice"),
    (["data", "train-vocab", "stdlib", "--vocab-size", "10"], "--vocab-size"),
    (["data", "train-vocab", "imagenet64:x"], "needs a text source"),
    (["data", "train-vocab", "stdlib", "--out", "x.txt"], "must end in .model"),
    (["data", "info", "nothere"], "neither a known name"),
    (["plot", "nothere"], "does not exist"),
    (["plot", R, "--out", "curves.xyz"], "image type"),
]


def test_bad_input_table_through_the_console_script(work):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    before = snapshot(work)
    failures = []
    for argv, match in CASES:
        proc = subprocess.run(tvq_command() + argv, cwd=work, env=env, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("tvq: error: ")
              and match in lines[0] and not proc.stdout)
        if not ok:
            failures.append(f"{argv}: rc {proc.returncode}, stdout {proc.stdout[:80]!r}, stderr {proc.stderr[-300:]!r}")
        if snapshot(work) != before:
            failures.append(f"{argv} changed the working folder")
            before = snapshot(work)
    assert not failures, "\n".join(failures)


def test_help_and_argument_errors_do_not_import_torch():
    code = ("import sys\nfrom tvq.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['bench', '--help'], ['train', '--device', 'tpu'],"
            " ['bench', '--repeats', '0'], ['sample', 'r', '--top-p', '2']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: tvq" in proc.stdout and "--max-new-tokens" not in proc.stdout  # help printed, errors in stderr
