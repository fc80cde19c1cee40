"""Codebook tools not in the paper: k-means initialisation and dead-code revival (off by default)."""

import os
import threading

import pytest
import torch
import torch.multiprocessing as mp

from tvq import TransformerVQ, TransformerVQConfig
from tvq.layers.vq import VectorQuantizer
from conftest import make_model, tiny_config

TOOLS = [dict(codebook_init="kmeans"), dict(codebook_revive=0.5), dict(codebook_init="kmeans", codebook_revive=0.5),
         dict(codebook_init="kmeans", codebook_revive=0.5, head_type="mqa")]


def clustered_keys(n_head=2, n_centers=8, d_k=4, per=40, seed=0):
    """Keys (1, H, n_centers * per, D_k) in tight, well-separated clusters, and the centers (H, n_centers, D_k)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_head, n_centers, d_k, generator=g, dtype=torch.float64) * 3
    keys = centers.repeat_interleave(per, 1) + 0.01 * torch.randn(n_head, n_centers * per, d_k, generator=g,
                                                                  dtype=torch.float64)
    return keys[None], centers


def _codebooks(model):
    return {n: t for n, t in model.state_dict().items() if "quantizer" in n}


class FakeGroup:
    """``world`` fake ranks in threads: ``all_reduce(rank)`` sums a tensor over them in place, in the
    same order on every rank (so the sums are bit-identical), as many times as they call it."""

    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def all_reduce(self, rank):
        def reduce(t):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            t.copy_(total)
        return reduce

    def run(self, fns):
        errors = []

        def call(fn):
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=call, args=(fn,)) for fn in fns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]


def test_config_rejects_bad_tool_settings():
    with pytest.raises(ValueError, match="codebook_init"):
        tiny_config(codebook_init="kmeans++")
    with pytest.raises(ValueError, match="codebook_revive"):
        tiny_config(codebook_revive=-1.0)
    with pytest.raises(ValueError, match="codebook init"):
        VectorQuantizer(1, 4, 2, 0.9, init="nope")


def test_tools_are_off_by_default_and_keep_the_state_dict():
    cfg = TransformerVQConfig()
    assert cfg.codebook_init == "random" and cfg.codebook_revive == 0.0
    assert set(_codebooks(make_model())) == {f"attns.{i}.quantizer.{b}" for i in range(2) for b in ("c_sum", "c_count")}


def test_kmeans_finds_the_clusters_of_the_first_batch():
    keys, centers = clustered_keys()
    vq = VectorQuantizer(2, 8, 4, 0.9, init="kmeans").double().train()
    before = vq(keys).commit.item()
    metrics = vq.apply_update()
    assert not bool(vq.kmeans_pending) and "usage" in metrics
    c = vq.codebook()  # (H, S, D_k)
    for h in range(2):  # every center has a codeword right on it (one code per cluster)
        assert torch.cdist(centers[h], c[h]).min(-1).values.max() < 0.05
    torch.testing.assert_close(vq.c_count, torch.full((2, 8), 40.0, dtype=torch.float64))
    assert vq.eval()(keys).commit.item() < 1e-3 * before
    vq.train()
    c_sum = vq.c_sum.clone()
    vq(keys)
    vq.apply_update()  # later updates are plain EMA steps
    torch.testing.assert_close(vq.c_sum, c_sum, atol=1e-2, rtol=1e-2)


def test_kmeans_over_fake_ranks_equals_one_process():
    keys, _ = clustered_keys(n_centers=12, per=20)
    keys = keys + 0.5 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    one = VectorQuantizer(2, 8, 4, 0.9, init="kmeans").double().train()
    one(keys)
    one.apply_update()
    group = FakeGroup(2)
    ranks = [VectorQuantizer(2, 8, 4, 0.9, init="kmeans").double().train() for _ in range(2)]
    perm = torch.randperm(keys.shape[2], generator=torch.Generator().manual_seed(1))
    for r, part in zip(ranks, perm.chunk(2)):  # any split of the keys over ranks
        r(keys[:, :, part])
    group.run([lambda r=r, i=i: r.apply_update(all_reduce=group.all_reduce(i)) for i, r in enumerate(ranks)])
    for r in ranks:
        torch.testing.assert_close(r.c_sum, one.c_sum, atol=1e-9, rtol=0)
        torch.testing.assert_close(r.c_count, one.c_count, atol=1e-9, rtol=0)
    assert torch.equal(ranks[0].c_sum, ranks[1].c_sum)  # ranks agree bit for bit


def test_revive_splits_busy_codes_into_dead_ones():
    keys, _ = clustered_keys(n_head=1, n_centers=2, per=50)
    vq = VectorQuantizer(1, 6, 4, 0.5, revive=0.5).double().train()
    with torch.no_grad():  # codes 0, 1 on the clusters with EMA count 10; 2..5 dead, far away
        vq.c_sum.copy_(torch.cat([keys[0, :, ::50], torch.full((1, 4, 4), 50.0, dtype=torch.float64)], 1))
        vq.c_count.copy_(torch.tensor([[1.0, 1.0, 0.1, 0.1, 0.1, 0.1]]))
        vq.c_sum[:, :2] *= 10
        vq.c_count[:, :2] *= 10
    vq(keys)
    far = vq.codebook()[0, 4:].clone()
    total = 0.5 * vq.c_count.sum() + 0.5 * 100  # the EMA's total count after this step
    metrics = vq.apply_update()
    assert metrics["revived"] == pytest.approx(2 / 6) and metrics["dead"] == pytest.approx(4 / 6)
    # a split moves count and never makes any; the two revived codes' leftovers (0.05 each) are dropped
    torch.testing.assert_close(vq.c_count.sum(), total - 0.1)
    c = vq.codebook()[0]
    assert (torch.cdist(c[2:4], c[:2]).min(-1).values < 1.0).all()  # two dead codes now sit on the clusters
    torch.testing.assert_close(c[4:], far)  # only one dead code per live code and step
    assert int(vq.n_updates) == 1


def test_revive_is_deterministic_and_a_no_op_without_dead_codes():
    keys, _ = clustered_keys()
    vqs = []
    for _ in range(2):
        torch.manual_seed(0)
        vq = VectorQuantizer(2, 16, 4, 0.9, revive=1.0).double().train()
        for _ in range(3):
            vq(keys)
            vq.apply_update()
        vqs.append(vq)
    assert torch.equal(vqs[0].c_sum, vqs[1].c_sum) and torch.equal(vqs[0].c_count, vqs[1].c_count)
    torch.manual_seed(0)
    plain = VectorQuantizer(2, 16, 4, 0.9).double().train()
    torch.manual_seed(0)
    low = VectorQuantizer(2, 16, 4, 0.9, revive=1e-9).double().train()  # nothing is ever that low
    for vq in (plain, low):
        vq(keys)
        vq.apply_update()
    assert torch.equal(plain.c_sum, low.c_sum)


@pytest.mark.parametrize("tools", TOOLS, ids=str)
def test_micro_batches_and_fake_ranks_equal_one_batch(tools):
    torch.manual_seed(5)
    ids = torch.randint(0, 50, (4, 90))
    one = make_model(**tools).train()
    micro = make_model(**tools).train()
    ranks = [make_model(**tools).train() for _ in range(2)]
    for _ in range(2):  # the first update runs k-means, the second revives
        one(ids)
        one.update_codebooks()
        micro(ids[:2])
        micro(ids[2:])
        micro.update_codebooks()
        group = FakeGroup(2)
        for r, part in zip(ranks, (ids[:2], ids[2:])):
            r(part)
        group.run([lambda r=r, i=i: r.update_codebooks(all_reduce=group.all_reduce(i)) for i, r in enumerate(ranks)])
    for model in (micro, *ranks):
        for name, t in _codebooks(one).items():
            torch.testing.assert_close(_codebooks(model)[name], t, atol=1e-9, rtol=0, msg=name)
    assert any((a != b).any() for a, b in zip(_codebooks(one).values(), _codebooks(make_model()).values()))


@pytest.mark.parametrize("tools", TOOLS, ids=str)
def test_checkpoint_round_trip_keeps_the_tool_state(tools):
    torch.manual_seed(6)
    ids = torch.randint(0, 50, (2, 60))
    model = make_model(**tools).train()
    model(ids)
    model.update_codebooks()
    loaded = make_model(seed=1, **tools).train()
    loaded.load_state_dict(model.state_dict())
    for m in (model, loaded):  # k-means is not run again after loading; revival continues identically
        m(ids.flip(1))
        m.update_codebooks()
    for name, t in _codebooks(model).items():
        assert torch.equal(_codebooks(loaded)[name], t), name


@pytest.mark.parametrize("tools", TOOLS, ids=str)
def test_blockwise_equals_quadratic_after_tool_updates(tools):
    torch.manual_seed(7)
    ids = torch.randint(0, 50, (2, 37))
    model = make_model(**tools).train()
    for _ in range(3):
        model(ids)
        model.update_codebooks()
    ref = TransformerVQ(model.config.replace(attn_impl="quadratic")).double().train()
    ref.load_state_dict(model.state_dict())
    a, b = model(ids, labels=ids), ref(ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-10, rtol=0)
    ga = torch.autograd.grad(a.loss, list(model.parameters()))
    gb = torch.autograd.grad(b.loss, list(ref.parameters()))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


def _gloo_rank(rank, port, ids, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = make_model(codebook_init="kmeans", codebook_revive=0.5).train()
        for _ in range(2):
            model(ids[2 * rank: 2 * rank + 2])
            model.update_codebooks(all_reduce=dist.all_reduce)
        torch.save(_codebooks(model), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_batch(tmp_path):
    from test_distributed import free_port

    torch.manual_seed(8)
    ids = torch.randint(0, 50, (4, 90))
    one = make_model(codebook_init="kmeans", codebook_revive=0.5).train()
    for _ in range(2):
        one(ids)
        one.update_codebooks()
    mp.spawn(_gloo_rank, args=(free_port(), ids, tmp_path), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, t in _codebooks(one).items():
            torch.testing.assert_close(got[name], t, atol=1e-9, rtol=0, msg=name)


def test_flag_copies_follow_a_loaded_state_by_any_route():
    """The host copies of kmeans_pending and n_updates (Python branches without read-back) follow a state
    dict loaded with load_state_dict or written into the buffers directly (as Hugging Face's loader does)."""
    keys, _ = clustered_keys()
    trained = VectorQuantizer(2, 8, 4, 0.9, init="kmeans", revive=0.5).double().train()
    for _ in range(3):  # k-means, then two EMA updates with revival
        trained(keys)
        trained.apply_update()
    assert not bool(trained.kmeans_pending) and int(trained.n_updates) == 2
    for route in ("load_state_dict", "assign"):
        fresh = VectorQuantizer(2, 8, 4, 0.9, init="kmeans", revive=0.5).double().train()
        if route == "load_state_dict":
            fresh.load_state_dict(trained.state_dict())
        else:
            with torch.no_grad():
                for name, buf in trained.named_buffers():
                    getattr(fresh, name).copy_(buf)
        assert not fresh._kmeans_pending and fresh._host("n_updates", int) == 2, route
        fresh(keys)
        fresh.apply_update()  # an EMA update with revival, not k-means again
        assert int(fresh.n_updates) == 3 and fresh._host("n_updates", int) == 3, route
