"""Data-parallel training on CPU with gloo: 2 ranks == 1 process (DDP and FSDP; FSDP with AdamW
and with Adafactor), gradient accumulation, resuming on another number of ranks, torchrun + the
real CLI, a failing rank; tvq's Adafactor on uneven FSDP shards against torch's on full tensors."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard  # (imports torch.distributed.nn before any group exists)
from torch.distributed.tensor import DTensor

from tvq.training import checkpoint as ckpt
from tvq.training.batches import SegmentSampler
from tvq.training.config import apply_overrides, preset
from tvq.training.adafactor import Adafactor
from tvq.training.distributed import Cluster, combine, leave_process_group, select_rows
from tvq.training.trainer import train
from conftest import sample_text

QUIET = dict(progress=False, log=lambda *a, **k: None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def run_jobs(rank: int, jobs: list) -> None:
    """A rank of a 2-process job: train each (port, cfg, run_dir, resume) in turn, one process group each."""
    for port, cfg, run_dir, resume in jobs:
        set_rank_env(rank, 2, port)
        train(cfg, run_dir, resume=resume, **QUIET)


def fail_at_step_2_on_rank_1(rank: int, port: int, cfg, run_dir, how: str) -> None:
    """A rank of a 2-process job whose rank 1 raises, or hangs, at step 2."""
    set_rank_env(rank, 2, port)
    if rank == 1:
        batch = SegmentSampler.batch

        def failing(self, step):
            if step == 2:
                if how == "raise":
                    raise RuntimeError("injected failure on rank 1")
                time.sleep(600)
            return batch(self, step)

        SegmentSampler.batch = failing
    train(cfg, run_dir, **QUIET)


class Uneven(nn.Module):
    """Parameters whose dim 0 (5, 3 or 1) splits unevenly over 2 ranks, so that rank 1's shards of
    ``row`` and ``single`` are empty. FSDP2 shards the rows of the matrices ``w`` and ``row`` and the
    batch dim of ``batch`` and ``single`` (3-D: batches of matrices for Adafactor)."""

    SHAPES = {"w": (5, 4), "batch": (3, 5, 4), "v": (5,), "row": (1, 6), "single": (1, 2, 3)}

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, shape in self.SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, 4] -> a scalar loss
        h = torch.tanh(x @ self.w.T) * self.v  # [n, 5]
        hb = torch.tanh(torch.einsum("bij,nj->nbi", self.batch, x)) * self.v  # [n, 3, 5]
        return ((h.sum(-1) ** 2).mean() + hb.square().mean() + (self.row.sum() * x.mean()) ** 2
                + torch.sin(self.single).sum() * x.sum())


def adafactor_under_fsdp(rank: int, port: int, out: Path) -> None:
    """A rank of a 2-process job: tvq's Adafactor on an FSDP2-sharded ``Uneven`` takes the steps of
    torch.optim.Adafactor on the full model (in every rank, with the mean loss of both ranks'
    inputs); the full state that ``Cluster.full_state_dicts`` gathers is torch's, and loaded with
    ``Cluster.load_optimizer`` into a new sharded model it goes on taking torch's steps. Rank 0
    writes the largest differences (float64) to ``out``."""
    set_rank_env(rank, 2, port)
    dist.init_process_group("gloo")
    diffs = adafactor_diffs(rank)
    if rank == 0:
        out.write_text(json.dumps(diffs))
    dist.barrier()  # both ranks are done with their collectives before either leaves (gloo aborted otherwise)
    leave_process_group()  # with the models and optimizers gone, the group is freed here


def adafactor_diffs(rank: int) -> dict:
    """The largest differences of :func:`adafactor_under_fsdp` (on rank 0; the others' are partial)."""
    cl = Cluster(rank, 2, rank, torch.device("cpu"), "fsdp")
    mesh = init_device_mesh("cpu", (2,))

    def groups(model):  # weight decay on the matrices only
        return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in model.parameters() if p.dim() < 2]}]

    def take_steps(pairs, steps):
        for step in steps:
            xs = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            for model, opt, is_sharded in pairs:
                for group in opt.param_groups:
                    group["lr"] = 0.02 / (1 + step)
                # FSDP averages the gradients of the ranks' losses
                loss = model(xs[rank]) if is_sharded else (model(xs[0]) + model(xs[1])) / 2
                loss.backward()
                opt.step()
                opt.zero_grad()

    def full(model):
        return {name: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
                for name, p in model.named_parameters()}

    def largest(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in b)

    sharded, reference = Uneven(), Uneven()
    start = full(reference)
    fully_shard(sharded, mesh=mesh)
    opt, ref = Adafactor(groups(sharded)), torch.optim.Adafactor(groups(reference))
    take_steps([(sharded, opt, True), (reference, ref, False)], range(5))
    diffs = {"moved": largest(full(reference), start), "params": largest(full(sharded), full(reference))}

    _, state = cl.full_state_dicts(sharded, opt)  # rank 0: keyed by parameter name
    if cl.is_main:
        names = {p: name for name, p in reference.named_parameters()}
        ref_state = {names[p]: s for p, s in ref.state.items()}
        assert state["state"].keys() == ref_state.keys() == Uneven.SHAPES.keys()
        assert all(state["state"][n].keys() == ref_state[n].keys() for n in ref_state)
        diffs["state"] = max((state["state"][n][k] - v).abs().max().item()
                             for n, s in ref_state.items() for k, v in s.items())
    shared = [state]
    dist.broadcast_object_list(shared, src=0)  # every rank loads the full state, as from a checkpoint
    resumed = Uneven()
    resumed.load_state_dict(full(sharded))
    fully_shard(resumed, mesh=mesh)
    opt = Adafactor(groups(resumed))
    cl.load_optimizer(resumed, opt, shared[0])
    take_steps([(resumed, opt, True), (reference, ref, False)], range(5, 10))
    diffs["resumed"] = largest(full(resumed), full(reference))
    return diffs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """~200 KB of text: one training file, three validation files of unequal length (so
    evaluation shares documents unevenly over the ranks), one test file."""
    raw = sample_text(200_000)
    root = tmp_path_factory.mktemp("data")
    files = {"train/a.txt": raw[:190_000], "validation/a.txt": raw[190_000:190_700],
             "validation/b.txt": raw[191_000:191_900], "validation/c.txt": raw[192_000:193_200],
             "test/a.txt": raw[194_000:]}
    for name, text in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(text)
    return root


def config(data_dir, *extra):
    # steps 0-4 are warmup, so a 3-step run and the first 3 steps of a 6-step run are the same
    return apply_overrides(preset("tiny"), [f"data={data_dir}", "log_every=1", "batch_size=4", "max_steps=3",
                                            "save_every=3", "sequence_len=128", "update_len=32",
                                            "sample_tokens=0", *extra])


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def losses(run_dir):
    records = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_loss(run_dir):
    records = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r["val/loss"] for r in records if "val/loss" in r][-1]


def weights(run_dir, step=3):
    return ckpt.load_model(Path(run_dir) / "checkpoints" / f"step_{step:08d}")[0].state_dict()


ADAFACTOR = "optimizer=adafactor"
MQA = "model.head_type=mqa"  # attention + MLP layers: FSDP shards each sublayer


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Reference runs in this process, then the 2-rank runs, all spawned at once. The runs whose
    name ends in ``_adafactor`` use Adafactor (FSDP steps sharded parameters), the others AdamW."""
    root = tmp_path_factory.mktemp("runs")
    for suffix, extra in (("", []), ("_adafactor", [ADAFACTOR])):
        train(config(data_dir, *extra), root / f"one{suffix}", **QUIET)  # 1 process, batch 4, 3 steps
        train(config(data_dir, "max_steps=6", *extra), root / f"straight{suffix}", **QUIET)  # uninterrupted, 6 steps
        copy_run(root / f"one{suffix}", root / f"one_then_fsdp{suffix}")
    train(config(data_dir, MQA), root / "one_mqa", **QUIET)
    jobs = [
        (free_port(), config(data_dir), root / "ddp", False),  # 2 ranks x 2 rows
        (free_port(), config(data_dir, "parallel=fsdp"), root / "fsdp", False),
        (free_port(), config(data_dir, "grad_accum=2"), root / "ddp_accum", False),  # 2 ranks x 2 x 1 row
        (free_port(), config(data_dir, "max_steps=6", "parallel=fsdp", "grad_accum=2"), root / "one_then_fsdp", True),
        (free_port(), config(data_dir, "parallel=fsdp", ADAFACTOR), root / "fsdp_adafactor", False),
        (free_port(), config(data_dir, "parallel=fsdp", MQA), root / "fsdp_mqa", False),
        (free_port(), config(data_dir, "max_steps=6", "parallel=fsdp", "grad_accum=2", ADAFACTOR),
         root / "one_then_fsdp_adafactor", True),
    ]
    mp.spawn(run_jobs, args=(jobs,), nprocs=2)
    return root


def reference(name: str, run: str) -> str:
    """The 1-process run ``run`` (``one``, ``straight``) with the optimizer and model of run ``name``."""
    return run + next((s for s in ("_adafactor", "_mqa") if name.endswith(s)), "")


@pytest.mark.parametrize("name", ["ddp", "fsdp", "ddp_accum", "fsdp_adafactor", "fsdp_mqa"])
def test_two_ranks_match_one_process(runs, name):
    one, two = weights(runs / reference(name, "one")), weights(runs / name)
    assert one.keys() == two.keys() and any("c_sum" in k for k in one)  # codebooks included
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    assert losses(runs / name) == pytest.approx(losses(runs / reference(name, "one")), rel=1e-5)
    assert val_loss(runs / name) == pytest.approx(val_loss(runs / reference(name, "one")), rel=1e-5)


def test_adafactor_and_adamw_runs_differ(runs):
    """The Adafactor runs above are compared with Adafactor references, not with AdamW ones."""
    adamw, adafactor = weights(runs / "one"), weights(runs / "one_adafactor")
    assert max((adamw[k] - adafactor[k]).abs().max().item() for k in adamw if "weight" in k) > 1e-3


def test_distributed_grad_accum_matches_one_batch(runs):
    accum, plain = weights(runs / "ddp_accum"), weights(runs / "ddp")
    for key in plain:
        torch.testing.assert_close(accum[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("saved_by", ["ddp", "fsdp", "fsdp_adafactor"])
def test_resume_two_rank_checkpoint_in_one_process(runs, data_dir, saved_by):
    run = copy_run(runs / saved_by, runs / f"{saved_by}_then_one")
    optimizer = [ADAFACTOR] if saved_by.endswith("_adafactor") else []  # a resume may not change the optimizer
    train(config(data_dir, "max_steps=6", *optimizer), run, resume=True, **QUIET)
    resumed, straight = losses(run), losses(runs / reference(saved_by, "straight"))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-5)


@pytest.mark.parametrize("name", ["one_then_fsdp", "one_then_fsdp_adafactor"])
def test_resume_one_process_checkpoint_on_two_fsdp_ranks(runs, name):
    resumed, straight = losses(runs / name), losses(runs / reference(name, "straight"))
    assert [resumed[s] for s in (1, 2, 3)] == [straight[s] for s in (1, 2, 3)]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-5)
    resumed, straight = weights(runs / name, 6), weights(runs / reference(name, "straight"), 6)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux shows thread names in /proc)."""
    names = ((task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
    return [name for name in names if "gloo" in name]


def train_then_list_gloo_threads(cfgs: list, run_dirs: list, out: Path) -> None:
    """A job of one rank (its own process): train each config; after each, list the gloo threads
    still alive. Then, as a control, the threads of a live group. Writes both to ``out``."""
    after = []
    for cfg, run_dir in zip(cfgs, run_dirs):
        set_rank_env(0, 1, free_port())
        train(cfg, run_dir, **QUIET)
        after.append(gloo_threads())
    set_rank_env(0, 1, free_port())
    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))  # gloo starts its threads with the first collective, not at init
    control = gloo_threads()
    leave_process_group()
    out.write_text(json.dumps({"after": after, "control": control}))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc (Linux)")
def test_a_finished_run_frees_its_process_group(data_dir, tmp_path):
    """No group outlives the run that made it (through DDP's or FSDP's reference cycles, DTensor's
    caches or torch.distributed.nn): one freed at interpreter exit now and then aborts the process."""
    cfgs = [config(data_dir, "parallel=fsdp", ADAFACTOR), config(data_dir, "parallel=ddp")]
    out = tmp_path / "threads.json"
    rank = mp.get_context("spawn").Process(target=train_then_list_gloo_threads,
                                           args=(cfgs, [tmp_path / "fsdp", tmp_path / "ddp"], out))
    rank.start()
    rank.join(timeout=120)
    if rank.is_alive():
        rank.kill()
        rank.join()
    assert rank.exitcode == 0
    threads = json.loads(out.read_text())
    assert threads["control"], "a live gloo group shows no named threads: this test cannot see a leak"
    assert threads["after"] == [[], []]


def test_adafactor_on_uneven_fsdp_shards_steps_like_torch_on_full_tensors(tmp_path):
    out = tmp_path / "diffs.json"
    mp.spawn(adafactor_under_fsdp, args=(free_port(), out), nprocs=2)
    diffs = json.loads(out.read_text())
    assert diffs["moved"] > 1e-2
    assert diffs["params"] < 1e-12 and diffs["state"] < 1e-12 and diffs["resumed"] < 1e-12, diffs


def test_torchrun_cli_resumes_with_other_rank_count_and_grad_accum(runs, data_dir):
    run = copy_run(runs / "one", runs / "one_then_torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "tvq", "train", "--out", str(run), "--resume",
           "--max-steps", "6", "--set", "grad_accum=2", "--set", "sample_tokens=8", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("validation: loss") == 1 and result.stdout.count(f"run saved to {run}") == 1
    assert result.stdout.count("sample:") == 1  # rank 0 alone reports and samples
    resumed, straight = losses(run), losses(runs / "straight")
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-5)


def test_torchrun_bad_input_is_one_line_and_exit_2(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "tvq", "train", "--preset", "tiny", "--data", str(data_dir),
           "--out", str(tmp_path / "r"), "--set", "batch_size=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("tvq: error: ")]
    assert len(lines) == 1 and "does not split over 2 ranks" in lines[0] and "exitcode  : 2" in result.stderr, \
        result.stderr[-4000:]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failing_rank_ends_the_job(data_dir, tmp_path, how):
    """Rank 1 raises (or hangs) at step 2; no launcher tears the job down, yet rank 0 stops with
    an error: at once when rank 1's process is gone, after dist_timeout when it hangs."""
    cfg = config(data_dir, "max_steps=6", "dist_timeout=15")
    ctx = mp.get_context("spawn")
    port = free_port()
    ranks = [ctx.Process(target=fail_at_step_2_on_rank_1, args=(r, port, cfg, tmp_path / "run", how)) for r in (0, 1)]
    t0 = time.perf_counter()
    for p in ranks:
        p.start()
    ranks[0].join(timeout=90)
    seconds = time.perf_counter() - t0
    ranks[1].join(timeout=30)  # rank 1 leaves the group only once rank 0 has given up on it
    for p in ranks:
        if p.is_alive():
            p.kill()
        p.join()
    assert ranks[0].exitcode not in (0, -9), f"rank 0: exit code {ranks[0].exitcode} after {seconds:.0f}s"
    if how == "raise":
        assert ranks[1].exitcode == 1


def test_state_rows_round_trip_over_blocks():
    """Row blocks of any sizes, in order, give back any rows of the global state."""
    from conftest import make_model

    model = make_model()
    state = model(torch.randint(0, 50, (6, 20))).state
    blocks = [combine([state], lambda ts, a=a, b=b: ts[0][a:b]) for a, b in ((0, 2), (2, 3), (3, 6))]
    for start, stop in ((0, 6), (1, 5), (3, 4), (2, 6)):
        part = select_rows(blocks, start, stop)
        for got, want in zip(part.layers, state.layers):
            assert torch.equal(got.keys, want.keys[start:stop])
            assert torch.equal(got.cache_mean, want.cache_mean[start:stop])
        assert part.pos == state.pos
    with pytest.raises(ValueError, match="has 6 rows"):
        select_rows(blocks, 4, 8)


def test_batch_must_split_over_ranks_and_micro_batches(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="batch_size 4 does not split over 2 ranks x grad_accum 4"):
        train(config(data_dir, "grad_accum=4"), tmp_path / "r", **QUIET)
    assert not (tmp_path / "r").exists()
