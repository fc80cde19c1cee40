"""lm-evaluation-harness on an exported tvq run, offline, with local tasks the test writes: its numbers
equal tvq's own log-likelihoods (multiple choice) and tvq's own long-context evaluation (perplexity)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

from tvq.cli import main  # noqa: E402
from tvq.data import ByteTokenizer  # noqa: E402
from tvq.data.corpus import split_from_documents  # noqa: E402
from tvq.hf.scoring import loglikelihood, loglikelihood_rolling  # noqa: E402
from tvq.training import checkpoint as ckpt  # noqa: E402
from tvq.training.evaluate import evaluate  # noqa: E402
from conftest import ROOT, sample_text  # noqa: E402

QUESTIONS = [
    {"question": "ROMEO: What light through yonder", "choices": ["window breaks", "door opens", "sky"], "answer": 0},
    {"question": "First Citizen: Before we proceed any", "choices": ["further", "closer", "more"], "answer": 0},
    {"question": "To be, or not to", "choices": ["be", "go", "see"], "answer": 0},
    {"question": "My kingdom for a", "choices": ["horse", "crown", "song"], "answer": 0},
]

MC_YAML = """task: tvq_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

PPL_YAML = """task: tvq_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""

GEN_YAML = """task: tvq_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me", "KING", "Now is the winter of our"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny trained run exported to HF, a multiple-choice task and a perplexity task of long documents."""
    root = tmp_path_factory.mktemp("lm_eval")
    text = sample_text(100_000)
    (root / "train.txt").write_bytes(text)
    run, out = root / "run", root / "hf"
    assert main(["train", "--preset", "tiny", "--data", str(root / "train.txt"), "--out", str(run),
                 "--no-progress", "--set", "max_steps=2", "--set", "sample_tokens=0"]) == 0
    assert main(["export", str(run), str(out)]) == 0
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    docs = [text[i: i + n].decode("utf-8", "ignore") for i, n in ((0, 1500), (5000, 600), (20000, 3000))]
    (tasks / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tasks / "tvq_mc.yaml").write_text(MC_YAML.format(data=tasks / "mc.jsonl"))
    (tasks / "tvq_ppl.yaml").write_text(PPL_YAML.format(data=tasks / "docs.jsonl"))
    (tasks / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in PROMPTS))
    (tasks / "tvq_gen.yaml").write_text(GEN_YAML.format(data=tasks / "gen.jsonl"))
    core, _ = ckpt.load_model(ckpt.find_checkpoint(run, "latest"))
    return out, tasks, docs, core.double().eval()


def simple_evaluate(out, tasks, names):
    from lm_eval import simple_evaluate as run
    from lm_eval.tasks import TaskManager

    return run(model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float64", tasks=names,
               task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=2, device="cpu", log_samples=True)


def test_multiple_choice_equals_tvq_loglikelihoods(setup):
    out, tasks, _, core = setup
    result = simple_evaluate(out, tasks, ["tvq_mc"])
    samples = sorted(result["samples"]["tvq_mc"], key=lambda s: s["doc_id"])
    enc = ByteTokenizer().encode
    correct = 0
    for sample, q in zip(samples, QUESTIONS):
        ours = [loglikelihood(core, enc(q["question"]), enc(" " + c)) for c in q["choices"]]
        theirs = [r[0] for r in sample["resps"]]
        for (ll, greedy), (ll_h, greedy_h) in zip(ours, theirs):
            assert ll_h == pytest.approx(ll, abs=1e-9) and bool(greedy_h) == greedy
        correct += int(np.argmax([ll for ll, _ in ours]) == q["answer"])
    assert result["results"]["tvq_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))


def test_perplexity_scores_whole_documents_like_tvq_eval(setup):
    out, tasks, docs, core = setup
    result = simple_evaluate(out, tasks, ["tvq_ppl"])
    samples = sorted(result["samples"]["tvq_ppl"], key=lambda s: s["doc_id"])
    enc = ByteTokenizer().encode
    for sample, doc in zip(samples, docs):  # one window per document: the whole of it in one pass
        assert sample["resps"][0][0] == pytest.approx(loglikelihood_rolling(core, enc(doc)), abs=1e-8)
    # tvq's own long-context evaluation (state carried over segments of 64 tokens) gives the same bpb
    split = split_from_documents([np.frombuffer(d.encode(), dtype=np.uint8) for d in docs], np.uint8,
                                 n_bytes=sum(len(d.encode()) for d in docs), n_words=0)
    ours = evaluate(core, split, segment_len=64)
    metrics = result["results"]["tvq_ppl"]
    assert metrics["bits_per_byte,none"] == pytest.approx(ours["bpb"], rel=1e-9)
    assert metrics["byte_perplexity,none"] == pytest.approx(2 ** ours["bpb"], rel=1e-9)
    words = sum(len(re.split(r"\s+", d)) for d in docs)  # lm-eval's word count
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(ours["loss"] * ours["tokens"] / words), rel=1e-9)


def test_generate_until_left_pads_batches_exactly(setup):
    """lm-eval batches prompts of different lengths, left-padded: each equals tvq's greedy decoding alone."""
    out, tasks, _, core = setup
    result = simple_evaluate(out, tasks, ["tvq_gen"])
    samples = sorted(result["samples"]["tvq_gen"], key=lambda s: s["doc_id"])
    tok = ByteTokenizer()
    for sample, prompt in zip(samples, PROMPTS):
        ids = tok.encode(prompt)
        new = core.generate(torch.tensor([ids]), 24, temperature=0)[0, len(ids):].tolist()
        new = new[: new.index(0)] if 0 in new else new  # token 0 is EOS: generation stops there
        text = tok.decode(new).split("\n\n")[0]
        assert sample["resps"][0][0] == text


def test_lm_eval_command_line(setup, tmp_path):
    out, tasks, docs, core = setup
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={out},trust_remote_code=True,dtype=float64", "--tasks", "tvq_ppl", "--include_path",
           str(tasks), "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "res")]
    subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True)
    (path,) = (tmp_path / "res").rglob("results_*.json")
    bpb = json.loads(path.read_text())["results"]["tvq_ppl"]["bits_per_byte,none"]
    total = sum(loglikelihood_rolling(core, ByteTokenizer().encode(d)) for d in docs)
    assert bpb == pytest.approx(-total / math.log(2) / sum(len(d.encode()) for d in docs), rel=1e-9)
