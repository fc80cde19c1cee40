"""tvq under the Hugging Face Trainer: CodebookUpdateCallback applies the codebook statistics once per optimizer
step (gradient accumulation included), exactly as update_codebooks() would, summed over data-parallel ranks."""

import copy
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from tvq.hf import CodebookUpdateCallback, TransformerVQForCausalLM, TransformerVQHFConfig  # noqa: E402
from tvq.hf.callbacks import core_models  # noqa: E402
from conftest import make_model  # noqa: E402

T = 16  # tokens per row
STEPS = 3
BATCH = 2


def hf_model(seed=0) -> TransformerVQForCausalLM:
    """A tiny float64 HF model holding make_model's weights (its codebooks spread over the keys)."""
    core = make_model(seed)
    model = TransformerVQForCausalLM(TransformerVQHFConfig.from_tvq(core.config)).double()
    model.model.load_state_dict(core.state_dict())
    return model


def dataset(n_rows: int) -> list[dict]:
    """Rows of token ids, every third right-padded (padding is no target and no codebook statistic)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n_rows):
        ids = torch.randint(0, 50, (T,), generator=g)
        mask = torch.ones(T, dtype=torch.long)
        if i % 3 == 1:
            mask[T - 3 - i % 5:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def buffers(core) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in core.named_buffers() if name.endswith(("c_sum", "c_count"))}


class Spy(TrainerCallback):
    """Listed before CodebookUpdateCallback: at each optimizer step records the codebooks before the update, the
    pending statistics, the non-padding tokens the step's forwards saw, and what update_codebooks() gives on a
    copy of the model; after the step (on_step_end), the codebooks the callback left."""

    def __init__(self, model: TransformerVQForCausalLM):
        self.steps: list[dict] = []
        self.tokens = 0
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        if module.training:
            self.tokens += int(kwargs["attention_mask"].sum())

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        core = model.model
        reference = copy.deepcopy(core)  # holds the same pending statistics
        metrics = reference.update_codebooks()
        self.steps.append({"before": buffers(core), "tokens": self.tokens,
                           "stats": [q.pending_stats().clone() for q in core._quantizers()],
                           "reference": buffers(reference), "metrics": metrics})
        self.tokens = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[-1]["after"] = buffers(model.model)
        self.steps[-1]["left"] = [q.pending_stats().clone() for q in model.model._quantizers()]


def train(tmp_path, callback: bool, grad_accum: int = 1):
    model = hf_model()
    start = buffers(model.model)
    spy = Spy(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=grad_accum, learning_rate=1e-2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="steps", logging_steps=2,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    callbacks = [spy] + ([CodebookUpdateCallback()] if callback else [])
    trainer = Trainer(model=model, args=args, train_dataset=dataset(BATCH * grad_accum * STEPS),
                      callbacks=callbacks)
    trainer.train()
    return model, start, spy, trainer


def test_without_the_callback_codebooks_stay_frozen(tmp_path):
    model, start, spy, _ = train(tmp_path, callback=False)
    assert len(spy.steps) == STEPS
    for name, value in buffers(model.model).items():
        assert torch.equal(value, start[name]), name
    # the statistics only pile up: nobody applies them
    tokens = sum(s["tokens"] for s in spy.steps)
    H = model.config.n_head
    for q in model.model._quantizers():
        assert q._split_stats(q.pending_stats())[1][0].sum().item() == tokens  # head 0's counts: one per token
        assert q.c_count.sum().item() == H * q.n_code  # still the initial counts of 1


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_callback_applies_one_ema_update_per_optimizer_step(tmp_path, grad_accum):
    model, start, spy, trainer = train(tmp_path, callback=True, grad_accum=grad_accum)
    core = model.model
    quantizers = core._quantizers()
    decay = core.config.codebook_decay
    H = core.config.n_head
    assert len(spy.steps) == STEPS
    assert all(torch.equal(spy.steps[0]["before"][k], v) for k, v in start.items())
    padded_steps = 0
    for step in spy.steps:
        # every micro-batch of the step is in the statistics, padding excluded
        assert (grad_accum - 1) * BATCH * T < step["tokens"] <= grad_accum * BATCH * T
        padded_steps += step["tokens"] < grad_accum * BATCH * T
        # the update is exactly update_codebooks() after the same forwards, applied once ...
        for name, value in step["after"].items():
            assert torch.equal(value, step["reference"][name]), name
        # ... which is one step of the EMA rule with these statistics
        for q, stats, left in zip(quantizers, step["stats"], step["left"]):
            S, K = q.n_code, q.d_k
            k_sum, count = stats[: H * S * K].view(H, S, K), stats[H * S * K: H * S * (K + 1)].view(H, S)
            assert torch.equal(count.sum(-1), torch.full((H,), float(step["tokens"]), dtype=count.dtype))
            name = _prefix(core, q)
            before, after = step["before"][name + "c_count"], step["after"][name + "c_count"]
            torch.testing.assert_close(after, decay * before + (1 - decay) * count, rtol=1e-12, atol=0)
            torch.testing.assert_close(step["after"][name + "c_sum"],
                                       decay * step["before"][name + "c_sum"] + (1 - decay) * k_sum,
                                       rtol=1e-12, atol=1e-15)
            expected = decay * before.sum().item() + (1 - decay) * H * step["tokens"]
            assert after.sum().item() == pytest.approx(expected, rel=1e-12)
            assert not left.any()  # the accumulator was cleared
    assert padded_steps  # the data did exercise padding
    for name, value in buffers(core).items():
        assert not torch.equal(value, start[name]), name
    # training logs carry the codebook health of the update at that step
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2]
    for entry in logs:
        metrics = spy.steps[entry["step"] - 1]["metrics"]
        assert {f"codebook/{k}": v for k, v in metrics.items()} == {k: v for k, v in entry.items()
                                                                      if k.startswith("codebook/")}


def _prefix(core, quantizer) -> str:
    """The state-dict prefix of a quantizer inside core."""
    return next(name + "." for name, m in core.named_modules() if m is quantizer)


class Wrapper(torch.nn.Module):
    """Holds the model as DDP and accelerate do."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_core_models_unwraps_and_rejects():
    model = hf_model()
    assert core_models(Wrapper(Wrapper(model))) == [model.model]
    assert core_models(model.model) == [model.model]
    assert core_models(torch.nn.Sequential(model)) == [model.model]  # found among the modules
    with pytest.raises(TypeError, match="no tvq model"):
        core_models(torch.nn.Linear(2, 2))


class FakeRanks:
    """torch.distributed as 2 data-parallel ranks, one thread each: all_reduce sums over the threads."""

    def __init__(self, n: int):
        self.n, self.barrier, self.slots, self.local = n, threading.Barrier(n), [None] * n, threading.local()
        self.calls = 0

    def all_reduce(self, t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        assert op == dist.ReduceOp.SUM and not async_op
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = sum(self.slots)  # the same order on every rank
        self.barrier.wait()
        t.copy_(total)
        self.calls += 1

    def run(self, fn, *args_per_rank) -> None:
        errors = []

        def target(rank):
            self.local.rank = rank
            try:
                fn(*args_per_rank[rank])
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]


def test_data_parallel_ranks_apply_the_global_batch_update(monkeypatch):
    ranks = FakeRanks(2)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", ranks.all_reduce)
    rows = dataset(4)
    batch = torch.stack([row["input_ids"] for row in rows])  # (4, T)
    mask = torch.stack([row["attention_mask"] for row in rows])
    models = [hf_model().train() for _ in range(2)]
    with torch.no_grad():
        for rank, model in enumerate(models):  # each rank's half of the global batch
            model(batch[rank::2], attention_mask=mask[rank::2], labels=batch[rank::2])
    callbacks = [CodebookUpdateCallback() for _ in range(2)]
    ranks.run(lambda cb, m: cb.on_optimizer_step(None, None, None, model=Wrapper(m)),  # as DDP holds it
              *zip(callbacks, models))
    assert ranks.calls == 2  # one collective per rank and step

    reference = hf_model().train()
    with torch.no_grad():
        for rank in range(2):  # the same forwards in one process
            reference(batch[rank::2], attention_mask=mask[rank::2], labels=batch[rank::2])
    metrics = reference.model.update_codebooks()
    expected, start = buffers(reference.model), buffers(hf_model().model)
    for model, cb in zip(models, callbacks):
        got = buffers(model.model)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-12, atol=1e-14)
            assert not torch.equal(got[name], start[name]), name
        logs = {"loss": 1.0}
        cb.on_log(None, SimpleNamespace(log_history=[], global_step=1), None, logs=logs)  # metrics read when logged
        del logs["loss"]
        assert logs == pytest.approx({f"codebook/{k}": v for k, v in metrics.items()}, rel=1e-9)
