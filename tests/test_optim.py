"""tvq's Adafactor against torch.optim.Adafactor in float64 (the sharded case is in
test_distributed.py): the same steps, the same state, a state dict that resumes exactly."""

import io
import re

import pytest
import torch
import torch.distributed as dist

from tvq.training.adafactor import Adafactor
from tvq.training.distributed import leave_process_group

SHAPES = [(7,), (5, 6), (3, 4, 5), (1, 9), ()]  # 1-D, 2-D, 3-D (a batch of matrices), one row, a scalar


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def groups(params, options):
    """The matrices and the vectors in two groups, the vectors without weight decay."""
    return [{"params": [p for p in params if p.dim() >= 2], **options},
            {"params": [p for p in params if p.dim() < 2], **options, "weight_decay": 0.0}]


def gradients(step, seed=1):
    """Gradients of scales 1e-3 to 1e3 (so the update clipping acts on some steps), with a zero row."""
    g = torch.Generator().manual_seed(seed + step)
    grads = [torch.randn(s, generator=g, dtype=torch.float64) * 10.0 ** (step % 4 - 2) for s in SHAPES]
    grads[1][2] = 0.0
    return grads


def run(optimizers, params_lists, steps, start=0, schedule=None):
    for step in range(start, start + steps):
        grads = gradients(step)
        for opt, params in zip(optimizers, params_lists):
            if schedule is not None:
                for group in opt.param_groups:
                    group["lr"] = schedule(step)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()


def max_diff(a, b):
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b))


OPTIONS = {
    "defaults": {},
    "weight_decay_maximize": dict(lr=0.05, weight_decay=0.1, maximize=True),
    "eps_d_beta2": dict(eps=(1e-3, 1e-2), d=1.5, beta2_decay=-0.6),  # eps1 above some variances
}


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("schedule", [None, lambda step: 0.02 * (step + 1) / 10], ids=["constant_lr", "lr_schedule"])
def test_matches_torch_adafactor(name, schedule):
    ours, theirs = make_params(), make_params()
    opt = Adafactor(groups(ours, OPTIONS[name]))
    ref = torch.optim.Adafactor(groups(theirs, OPTIONS[name]))
    run([opt, ref], [ours, theirs], steps=10, schedule=schedule)
    assert max_diff(ours, theirs) < 1e-12
    assert max_diff(ours, make_params()) > 1e-3  # the parameters did move
    state, ref_state = opt.state_dict()["state"], ref.state_dict()["state"]
    assert state.keys() == ref_state.keys() and len(state) == len(SHAPES)
    for i in state:
        assert state[i].keys() == ref_state[i].keys()
        for key in state[i]:
            torch.testing.assert_close(state[i][key], ref_state[i][key], rtol=0, atol=1e-12, msg=f"{i} {key}")


def test_eps1_none_is_the_dtype_epsilon():
    """A float32 parameter with float32 gradients: the same steps as torch's in float32."""
    ours, theirs = ([p.detach().float().requires_grad_() for p in make_params()] for _ in range(2))
    opt, ref = Adafactor(ours, weight_decay=0.01), torch.optim.Adafactor(theirs, weight_decay=0.01)
    for step in range(10):
        for params, o in ((ours, opt), (theirs, ref)):
            for p, g in zip(params, gradients(step)):
                p.grad = g.float()
            o.step()
    assert max_diff(ours, theirs) < 1e-6


def saved(optimizer):
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("saved_by", [Adafactor, torch.optim.Adafactor], ids=["tvq", "torch"])
def test_state_dict_round_trip(saved_by):
    """Five steps, save, load into a new optimizer on copies of the parameters: both continue
    identically. A state saved by torch's Adafactor (runs trained before this one existed) loads too."""
    options = dict(weight_decay=0.1, lr=0.05)
    params = make_params()
    first = saved_by(groups(params, options))
    run([first], [params], steps=5)
    copies = clone(params)
    second = Adafactor(groups(copies, options))
    second.load_state_dict(saved(first))
    reference = make_params()
    straight = Adafactor(groups(reference, options))
    run([straight], [reference], steps=5)
    run([second], [copies], steps=5, start=5)
    run([straight], [reference], steps=5, start=5)
    assert max_diff(copies, reference) < 1e-12
    if saved_by is Adafactor:
        run([first], [params], steps=5, start=5)
        assert max_diff(params, copies) == 0.0


def test_bad_hyperparameters():
    p = make_params()
    for kwargs, match in ((dict(lr=-1.0), "Learning rate"), (dict(beta2_decay=0.5), "beta2_decay"),
                          (dict(eps=(-1.0, 1e-3)), "epsilon1"), (dict(d=0.5), "Clipping threshold")):
        with pytest.raises(ValueError, match=match):
            Adafactor(p, **kwargs)


@pytest.fixture
def one_rank_mesh():
    """A process group of one rank (no other process) and its 1-D device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        leave_process_group()  # freed now, not when pytest exits


def test_parameter_placements_other_than_fsdp_shard_0_are_refused(one_rank_mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    fine = distribute_tensor(torch.randn(4, 3), one_rank_mesh, [Shard(0)])
    for placement in (Replicate(), Shard(1)):
        bad = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), one_rank_mesh, [placement]))
        with pytest.raises(ValueError, match=re.escape(f"placements ({placement!r},)")):
            Adafactor([bad])
        opt = Adafactor([torch.nn.Parameter(fine)])
        with pytest.raises(ValueError, match=re.escape(f"placements ({placement!r},)")):
            opt.add_param_group({"params": [bad]})
        assert len(opt.param_groups) == 1


def test_sharded_path_on_one_rank_steps_like_plain_tensors(one_rank_mesh):
    """DTensor parameters sharded over a mesh of one rank go through the sharded path (state as
    DTensors, all-reduces) and give the steps of plain tensors."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    plain = make_params()[:4]  # a scalar cannot be sharded
    sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), one_rank_mesh, [Shard(0)])) for p in plain]
    opt, ref = Adafactor(sharded, weight_decay=0.1), Adafactor(plain, weight_decay=0.1)
    for step in range(6):
        for p, q, g in zip(sharded, plain, gradients(step)):
            p.grad = distribute_tensor(g, one_rank_mesh, [Shard(0)])
            q.grad = g
        opt.step()
        ref.step()
    assert max_diff([p.to_local() for p in sharded], plain) < 1e-12
    assert all(isinstance(t, DTensor) for s in opt.state.values() for k, t in s.items() if k != "step")
