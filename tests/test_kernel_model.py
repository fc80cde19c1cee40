"""A whole model with every Triton kernel on (attention, cache sums, norms, the GAU's activation and gate, the residual
add) against the PyTorch path: a training step's loss, logits, carried state and every parameter's gradient, for
each head type, in float32 and under bf16 autocast. Without a GPU the kernels run in Triton's interpreter."""

import pytest
import torch
from conftest import close_to_reference as close
from conftest import make_model

pytest.importorskip("triton")

from tvq.ops.kernels import use_kernels  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def step(model, ids, kernels, amp=None):
    """Two chunks (the second reads a carried cache): logits, loss, the final state and the parameters' gradients."""
    model.zero_grad()
    with use_kernels(kernels), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        first = model(ids[:, :24], labels=ids[:, :24])
        out = model(ids[:, 24:], state=first.state, labels=ids[:, 24:])
        (first.loss + out.loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("head_type", ["shga", "mha", "mqa"])
def test_training_step_matches_in_float32(head_type):
    model = make_model(dtype=torch.float32, head_type=head_type, n_layer=2)
    ids = torch.randint(0, 50, (2, 48), generator=torch.Generator().manual_seed(1))
    want, want_g = step(model, ids, False)
    got, got_g = step(model, ids, True)
    close(got.logits, want.logits, 1e-5)
    close(got.loss, want.loss, 1e-5)
    for a, b in zip(got.state.layers, want.state.layers):
        assert torch.equal(a.cache_count, b.cache_count)
        close(a.cache_mean, b.cache_mean, 1e-5)
    assert got_g.keys() == want_g.keys()
    for name, g in want_g.items():
        close(got_g[name], g, 1e-4)


def test_training_step_under_bf16_autocast():
    """The norm writes the projections' input in bf16, the gate and residual kernels read bf16: as close to the
    float32 step as the PyTorch path under the same autocast (bf16 rounding flips a few codes either way, so the
    two bf16 steps are compared by their mean error against float32, not element by element)."""
    model = make_model(dtype=torch.float32, n_layer=2)
    ids = torch.randint(0, 50, (2, 48), generator=torch.Generator().manual_seed(2))
    ref, ref_g = step(model, ids, False)
    torch_, torch_g = step(model, ids, False, torch.bfloat16)
    kern, kern_g = step(model, ids, True, torch.bfloat16)

    def err(a, b):
        return ((a.double() - b.double()).abs().mean() / b.double().abs().mean()).item()

    assert err(kern.logits, ref.logits) < 2 * err(torch_.logits, ref.logits) + 1e-3
    for name, g in ref_g.items():
        assert err(kern_g[name], g) < 2 * err(torch_g[name], g) + 1e-2, name


def test_dropout_and_layerdrop_run_in_the_residual_kernel():
    """With dropout and LayerDrop the kernel draws its own masks: the step runs, every parameter gets a finite
    gradient, and the same seed repeats the step exactly."""
    model = make_model(dtype=torch.float32, n_layer=2, dropout_res=0.3, layerdrop=0.2)
    ids = torch.randint(0, 50, (2, 48), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    a, a_g = step(model, ids, True)
    torch.manual_seed(0)
    b, b_g = step(model, ids, True)
    assert torch.equal(a.logits, b.logits)
    assert all(torch.isfinite(g).all() and torch.equal(g, b_g[n]) for n, g in a_g.items())


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_every_sublayers_weights_cast_in_one_copy(monkeypatch, grad_checkpoint):
    """On the Triton path under autocast the model casts every attention sublayer's weights in one multi-tensor copy
    per forward (a recomputed sublayer reuses its cast), and backward casts no gradient (the GEMMs write them in
    float32; the values: test_training_step_under_bf16_autocast, which takes this path)."""
    model = make_model(dtype=torch.float32, n_layer=2, grad_checkpoint=grad_checkpoint)
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(4))
    copies = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: copies.append(len(dst)) or real(dst, src))
    with use_kernels(True), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
        n_fwd = len(copies)
        out.loss.backward()
    n_attn = len(model.attns)
    assert copies[:n_fwd] == [4 * n_attn]  # W_q, W_kvg, W_o, W_r of each: one copy
    assert copies[n_fwd:] == []
    grads = [p.grad for a in model.attns for p in (a.w_q.weight, a.w_kvg.weight, a.w_o.weight, a.w_r.weight)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_sharded_weights_are_not_cast_ahead(tmp_path):
    """FSDP2 keeps a sublayer's weights sharded (DTensors) until that sublayer runs: the model must not cast them
    ahead (cast_plan None), while plain weights are; nor hand a sharded norm to the sublayer before (_next_norms)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    model = make_model(dtype=torch.float32, n_layer=1)
    attn = model.attns[0]
    x = torch.randn(1, 4, model.config.d_model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with use_kernels(True), torch.autocast("cpu", dtype=torch.bfloat16):
            assert attn.cast_plan(x) is not None
            mesh = init_device_mesh("cpu", (1,))
            attn.w_o.weight = torch.nn.Parameter(distribute_tensor(attn.w_o.weight.detach(), mesh, [Replicate()]))
            assert attn.cast_plan(x) is None
            assert model._next_norms(x)[0] is model.attns[1].norm
            norm = model.attns[1].norm
            norm.weight = torch.nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Replicate()]))
            assert model._next_norms(x) == [None, None]
    finally:
        dist.destroy_process_group()
