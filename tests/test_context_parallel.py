"""Context parallelism (tvq.parallel) is exact: C gloo processes, each with one chunk of the segment, against
one process on the whole segment, in float64: logits, losses, every parameter gradient (the mean over the
ranks), the codebook statistics (their sum), the state after the segment, inference logits and loss; the
bytes sent; under DDP with 2 x 2 ranks; long-context evaluation; and the trainer's ``context_parallel``
(training and ``tvq eval``)."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tvq import parallel
from tvq.data.corpus import split_from_documents
from tvq.parallel import ContextParallel, traffic
from tvq.state import TransformerVQState
from tvq.training import checkpoint as ckpt
from tvq.training.config import apply_overrides, preset
from tvq.training.distributed import combine
from tvq.training.evaluate import evaluate as evaluate_split, evaluate_run
from tvq.training.trainer import train
from conftest import make_model, sample_text

pytestmark = pytest.mark.usefixtures("one_thread")

B, WARM = 2, 12  # rows; tokens before the segment
CHUNK = {2: 12, 4: 8}  # tokens per rank, by number of ranks: longer than mem_len (8), and equal to it

# name -> (config overrides, how the segment starts: "carried" (a state after WARM tokens), "fresh",
# "left_pad" (a fresh state, rows padded on the left by 3 and 14 tokens: past the first rank's chunk) or
# "right_pad" (a carried state, row 1's last 14 tokens masked out by token_mask))
CASES = {
    f"shga-{rule}-agg{int(agg)}-thru{int(thru)}": (dict(straight_through=rule, agg_cache=agg, grad_thru_cache=thru),
                                                   "carried")
    for rule in ("window", "block") for agg in (True, False) for thru in (True, False)
}
CASES.update({
    "mha-window": (dict(head_type="mha"), "carried"),
    "mqa-block": (dict(head_type="mqa", straight_through="block", grad_thru_cache=False), "carried"),
    "shga-fresh": ({}, "fresh"),
    "shga-left_pad": (dict(cache_bias=True), "left_pad"),
    "shga-right_pad": ({}, "right_pad"),
    "shga-block-checkpoint": (dict(straight_through="block", grad_checkpoint=True, n_layer=2), "carried"),
})
CASES_4 = ["shga-window-agg1-thru1", "shga-block-agg1-thru0", "mqa-block", "shga-left_pad"]


def setup(name: str, n_ranks: int) -> tuple:
    """The model (training mode, float64) and the inputs of :func:`step`: the segment's ids and labels
    (B, C CHUNK), its starting state, left_pad and token_mask."""
    T = n_ranks * CHUNK[n_ranks]
    overrides, start = CASES[name]
    model = make_model(seed=1, **overrides).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (B, WARM + T + 1), generator=g)
    labels = ids[:, WARM + 1:].clone()
    labels[0, 3] = -100  # an ignored label
    state = left_pad = token_mask = None
    if start in ("carried", "right_pad"):
        with torch.no_grad():
            state = model.eval()(ids[:, :WARM]).state
        model.train()
    elif start == "left_pad":
        left_pad = torch.tensor([3, 14])
    if start == "right_pad":
        token_mask = torch.ones(B, T, dtype=torch.bool)
        token_mask[1, -14:] = False
        labels[1, -14:] = -100
    return model, (ids[:, WARM: WARM + T], labels, state, left_pad, token_mask)


def chunk_of(inputs: tuple, cols: slice) -> tuple:
    """The inputs of :func:`step` for the tokens ``cols`` of the segment."""
    ids, labels, state, left_pad, token_mask = inputs
    return ids[:, cols], labels[:, cols], state, left_pad, None if token_mask is None else token_mask[:, cols]


def step(model, inputs: tuple, context=None) -> dict:
    """One forward and backward of ``model`` (or of a DDP module wrapping it): what the test compares."""
    ids, labels, state, left_pad, token_mask = inputs
    out = model(ids, state=state, labels=labels, left_pad=left_pad, token_mask=token_mask, context=context)
    out.loss.backward()
    model = getattr(model, "module", model)
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "commit": out.commit_loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "stats": model.codebook_stats().clone(),
            "state": [[None if t is None else t.detach() for t in layer._tensors()] for layer in out.state.layers],
            "pos": out.state.pos}


def evaluate(model, inputs: tuple, context=None) -> tuple:
    """An inference forward (eval mode, no autograd): its logits and loss."""
    ids, labels, state, left_pad, token_mask = inputs
    with torch.no_grad():
        out = model.eval()(ids, state=state, labels=labels, left_pad=left_pad, token_mask=token_mask,
                           context=context)
    return out.logits, out.loss


def rank_job(rank: int, n_ranks: int, port: int, names: list[str], out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n_ranks)
    cp = ContextParallel(dist.new_group(list(range(n_ranks))))
    sent = []  # bytes this rank sends in the exchange's collectives, counted as ring collectives do
    gather, reduce_scatter = parallel._gather, dist.reduce_scatter_single

    def counting_gather(piece, group):
        sent.append(piece.numel() * piece.element_size() * (n_ranks - 1))
        return gather(piece, group)

    def counting_reduce_scatter(out, grad, **kwargs):
        sent.append(out.numel() * out.element_size() * (n_ranks - 1))
        return reduce_scatter(out, grad, **kwargs)

    parallel._gather, dist.reduce_scatter_single = counting_gather, counting_reduce_scatter
    results = {}
    for name in names:
        model, inputs = setup(name, n_ranks)
        sent.clear()
        T = CHUNK[n_ranks]
        mine = chunk_of(inputs, slice(rank * T, (rank + 1) * T))
        results[name] = step(model, mine, cp)
        results[name]["sent"] = sum(sent)
        results[name]["eval"] = evaluate(model, mine, cp)
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def dp_cp_job(rank: int, port: int, name: str, out: Path) -> None:
    """A rank of 2 data-parallel groups x 2 context-parallel ranks: DDP averages the gradients over all 4
    ranks (on the world group), the chunks are exchanged on each row's own group of 2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=4)
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes every group
    row, part = divmod(rank, 2)
    cp = ContextParallel(groups[row])
    model, inputs = setup(name, 2)
    net = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    got = step(net, chunk_of(one_row(inputs, row), slice(part * CHUNK[2], (part + 1) * CHUNK[2])), cp)
    dist.all_reduce(got["stats"])  # the codebook update's sum: over the whole world
    torch.save(got, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def one_row(inputs: tuple, row: int) -> tuple:
    """The inputs of :func:`step` for one row."""
    rows = slice(row, row + 1)
    return tuple(None if t is None else combine([t], lambda ts: ts[0][rows]) if isinstance(t, TransformerVQState)
                 else t[rows] for t in inputs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """n_ranks -> each rank's results, all cases run in one job per n_ranks."""
    got = {}
    for n_ranks, names in ((2, list(CASES)), (4, CASES_4)):
        out = tmp_path_factory.mktemp(f"cp{n_ranks}")
        mp.spawn(rank_job, args=(n_ranks, free_port(), names, out), nprocs=n_ranks)
        got[n_ranks] = [torch.load(out / f"rank{r}.pt") for r in range(n_ranks)]
    return got


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=what)


@pytest.mark.parametrize("n_ranks,name", [(2, n) for n in CASES] + [(4, n) for n in CASES_4])
def test_ranks_match_one_process(ranks, n_ranks, name):
    model, inputs = setup(name, n_ranks)
    one = step(model, inputs)
    per_rank = [results[name] for results in ranks[n_ranks]]
    logits, loss = evaluate(model, inputs)
    close(torch.cat([r["eval"][0] for r in per_rank], 1), logits, "inference logits")
    for r in per_rank:
        close(r["eval"][1], loss, "inference loss")
    close(torch.cat([r["logits"] for r in per_rank], 1), one["logits"], "logits")
    for r in per_rank:
        close(r["loss"], one["loss"], "loss")
        close(r["commit"], one["commit"], "commit loss")
        assert r["pos"] == one["pos"]
        for i, (layer, want) in enumerate(zip(r["state"], one["state"])):
            for field, a, b in zip(("keys", "values", "codes", "cache_count", "cache_mean"), layer, want):
                close(a, b, f"state.layers[{i}].{field}")
    assert one["grads"].keys() == per_rank[0]["grads"].keys() and len(one["grads"]) > 5
    for n, g in one["grads"].items():
        close(sum(r["grads"][n] for r in per_rank) / n_ranks, g, f"gradient of {n}")
    close(sum(r["stats"] for r in per_rank), one["stats"], "codebook statistics")
    if not model.config.grad_checkpoint:  # (which gathers again in the backward)
        expected = traffic(model.config, B, inputs[0].shape[1], n_ranks, cache_bytes=8)["tvq"]
        assert [r["sent"] for r in per_rank] == [expected] * n_ranks, "bytes sent, against tvq.parallel.traffic"


@pytest.mark.parametrize("name", ["shga-window-agg1-thru1", "shga-left_pad", "shga-right_pad"])
def test_data_parallel_x_context_parallel_with_ddp_matches_one_process(tmp_path, name):
    mp.spawn(dp_cp_job, args=(free_port(), name, tmp_path), nprocs=4)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    one = []  # one process per row (a data-parallel rank without context parallelism)
    for row in (0, 1):
        model, inputs = setup(name, 2)
        one.append(step(model, one_row(inputs, row)))
    for r, got in enumerate(per_rank):
        row, part = divmod(r, 2)
        close(got["logits"], one[row]["logits"][:, part * CHUNK[2]: (part + 1) * CHUNK[2]], "logits")
        close(got["loss"], one[row]["loss"], "loss")
        for n in one[0]["grads"]:  # every rank holds DDP's average
            close(got["grads"][n], (one[0]["grads"][n] + one[1]["grads"][n]) / 2, f"gradient of {n}")
        close(got["stats"], one[0]["stats"] + one[1]["stats"], "codebook statistics")
        for i, (layer, want) in enumerate(zip(got["state"], one[row]["state"])):
            for field, a, b in zip(("keys", "values", "codes", "cache_count", "cache_mean"), layer, want):
                close(a, b, f"state.layers[{i}].{field}")


def test_chunks_shorter_than_mem_len_are_refused():
    model = make_model()
    cp = ContextParallel.__new__(ContextParallel)  # no group needed to check shapes
    cp.rank, cp.size = 0, 2
    with pytest.raises(ValueError, match="shorter than mem_len = 8"):
        model(torch.zeros(1, 6, dtype=torch.long), context=cp)
    model = make_model(straight_through="block")
    with pytest.raises(ValueError, match="not a multiple of block_len = 4"):
        model(torch.zeros(1, 10, dtype=torch.long), context=cp)
    model = make_model(attention="full")
    with pytest.raises(ValueError, match="needs attention='vq'"):
        model(torch.zeros(1, 8, dtype=torch.long), context=cp)


# ---------------------------------------------------------------- evaluation: evaluate(..., context=cp)

EVAL_SEGMENT = 24  # chunks of 12 on 2 ranks (mem_len 8)
EVAL_RUNS = [dict(), dict(max_tokens=120), dict(reset_every=48)]  # keyword arguments of evaluate


def eval_split():
    """Documents of 100 tokens (4 whole segments, then one of 4 tokens), 30 and 7 (shorter than a segment)."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 50, n).astype(np.uint8) for n in (100, 30, 7)]
    return split_from_documents(docs, np.uint8, n_bytes=137, n_words=20)


def eval_rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cp = ContextParallel(dist.new_group([0, 1]))
    model = make_model(seed=1, n_layer=2)
    got = [evaluate_split(model, eval_split(), segment_len=EVAL_SEGMENT, byte_level=False, rank=rank, world_size=2,
                          context=cp, **kwargs) for kwargs in EVAL_RUNS]
    torch.save(got, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_evaluation_over_context_parallel_ranks_matches_one_process(tmp_path):
    """2 ranks score each segment of the same documents (a chunk each), the state carried across segments."""
    mp.spawn(eval_rank, args=(free_port(), tmp_path), nprocs=2)
    model = make_model(seed=1, n_layer=2)
    for i, kwargs in enumerate(EVAL_RUNS):
        one = evaluate_split(model, eval_split(), segment_len=EVAL_SEGMENT, byte_level=False, **kwargs)
        for r in range(2):
            got = torch.load(tmp_path / f"rank{r}.pt")[i]
            assert got.keys() == one.keys() and got["tokens"] == one["tokens"], kwargs
            for key in ("loss", "bpb", "ppl"):
                close(torch.tensor(got[key]), torch.tensor(one[key]), f"{key} {kwargs}")


def test_evaluation_context_errors():
    model, split = make_model(), eval_split()
    cp = ContextParallel.__new__(ContextParallel)  # no group needed to check shapes
    cp.rank, cp.size = 1, 2
    with pytest.raises(ValueError, match="segment_len 25 is not divisible by context_parallel 2"):
        evaluate_split(model, split, segment_len=25, rank=1, world_size=2, context=cp)
    with pytest.raises(ValueError, match="shorter than mem_len = 8"):
        evaluate_split(model, split, segment_len=12, rank=1, world_size=2, context=cp)
    with pytest.raises(ValueError, match="must form group d"):
        evaluate_split(model, split, segment_len=24, rank=0, world_size=2, context=cp)


# ---------------------------------------------------------------- the trainer: --set context_parallel=C

QUIET = dict(progress=False, log=lambda *a, **k: None)


def train_config(data_dir, *extra):
    return apply_overrides(preset("tiny"), [f"data={data_dir}", "log_every=1", "batch_size=4", "max_steps=3",
                                            "save_every=3", "sequence_len=128", "update_len=32",
                                            "sample_tokens=0", *extra])


def train_rank(rank: int, n_ranks: int, port: int, cfg, run_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n_ranks),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n_ranks))
    torch.set_num_threads(1)
    train(cfg, run_dir, **QUIET)


def eval_run_rank(rank: int, n_ranks: int, port: int, run_dir: Path, out: Path) -> None:
    """``tvq eval`` under torchrun."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(n_ranks),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n_ranks))
    torch.set_num_threads(1)
    (out / f"rank{rank}.json").write_text(json.dumps(evaluate_run(run_dir, device="cpu")))


def run_losses(run_dir: Path) -> dict:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_trainer_context_parallel_matches_one_process_and_resumes_in_one(tmp_path):
    """2 ranks sharing each update segment (mem_len 16, chunks of 16) train as one process does, with FSDP
    and with DDP; the DDP run resumes in one process and goes on as an uninterrupted run."""
    data = tmp_path / "data"
    for name, text in {"train/a.txt": sample_text(60_000), "validation/a.txt": sample_text(61_000)[60_000:]}.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(text)
    train(train_config(data), tmp_path / "one", **QUIET)
    train(train_config(data, "max_steps=6"), tmp_path / "straight", **QUIET)
    one = ckpt.load_model(tmp_path / "one" / "checkpoints" / "step_00000003")[0].state_dict()
    for run in ("fsdp", "cp"):  # FSDP, then DDP
        cfg = train_config(data, "context_parallel=2", *(["parallel=fsdp"] if run == "fsdp" else []))
        mp.spawn(train_rank, args=(2, free_port(), cfg, tmp_path / run), nprocs=2)
        assert run_losses(tmp_path / run) == pytest.approx(run_losses(tmp_path / "one"), rel=1e-5)
        got = ckpt.load_model(tmp_path / run / "checkpoints" / "step_00000003")[0].state_dict()
        for key in one:
            torch.testing.assert_close(got[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{run}: {key}")
    # tvq eval of the fsdp run (context_parallel = 2) on 2 ranks: each validation segment over both
    mp.spawn(eval_run_rank, args=(2, free_port(), tmp_path / "fsdp", tmp_path), nprocs=2)
    single = evaluate_run(tmp_path / "fsdp", device="cpu")  # not under torchrun: one process
    numbers = {k: v for k, v in single.items() if isinstance(v, (int, float))}
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got.keys() == single.keys() and {k: got[k] for k in single if k not in numbers} == {
            k: v for k, v in single.items() if k not in numbers}
        assert {k: got[k] for k in numbers} == pytest.approx(numbers, rel=1e-6)
    train(train_config(data, "max_steps=6"), tmp_path / "cp", resume=True, **QUIET)
    resumed, straight = run_losses(tmp_path / "cp"), run_losses(tmp_path / "straight")
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-5)


def test_trainer_context_parallel_errors(tmp_path):
    with pytest.raises(ValueError, match="shorter than mem_len = 16"):
        train_config(tmp_path, "context_parallel=4")
    with pytest.raises(ValueError, match="update_len 32 is not divisible by context_parallel 3"):
        train_config(tmp_path, "context_parallel=3")
    with pytest.raises(ValueError, match="context_parallel 2 does not divide the 1 ranks"):
        train(train_config(tmp_path, "context_parallel=2"), tmp_path / "r", **QUIET)
    assert not (tmp_path / "r").exists()


def test_context_benchmark_counts_what_it_sends(tmp_path):
    """``python -m tvq.bench.context``: each rank's bytes sent, counted as sent, equal the computed traffic,
    and the losses of 1 and 2 processes on the same sequence agree (float32)."""
    from tvq.bench import context

    config = dict(vocab_size=64, d_model=32, d_k=8, d_v=16, n_head=1, n_layer=1, n_code=8, block_len=8, mem_len=8)
    one, two = (context.run_case(config, C, 32, steps=1, warmup=0, threads=1) for C in (1, 2))
    assert one["sent_bytes"] == [0] and two["sent_bytes"] == [two["sent_bytes_computed"]] * 2 > [0, 0]
    assert two["ring_attention_bytes"] > 0 and two["tokens_per_rank"] == 16
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    assert all(m > 0 for m in two["peak_gib"])


def test_context_benchmark_bad_lengths(capsys):
    from tvq.bench import context
    from tvq.usage import run_command

    assert run_command(lambda: context.main(["--ranks", "3", "--seq-lens", "1024"])) == 2
    assert "not a multiple of --ranks 3" in capsys.readouterr().err
