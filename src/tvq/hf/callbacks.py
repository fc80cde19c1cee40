"""A Hugging Face ``Trainer`` callback that keeps tvq's codebooks learning (docs/spec.md section 2)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from tvq.models.transformer_vq import TransformerVQ


def core_models(model: nn.Module) -> list[TransformerVQ]:
    """The :class:`~tvq.TransformerVQ` modules inside ``model``: the model itself, the ``.model`` of a
    :class:`~tvq.hf.TransformerVQForCausalLM`, either behind wrappers that hold the model as ``.module``
    (DistributedDataParallel, accelerate, DeepSpeed) or ``._orig_mod`` (torch.compile), or else every
    one found among ``model.modules()`` (adapters, a tvq model inside a larger one)."""
    inner = model
    while True:
        if isinstance(inner, TransformerVQ):
            return [inner]
        if isinstance(getattr(inner, "model", None), TransformerVQ):
            return [inner.model]
        wrapped = getattr(inner, "module", None)
        wrapped = wrapped if isinstance(wrapped, nn.Module) else getattr(inner, "_orig_mod", None)
        if not isinstance(wrapped, nn.Module):
            break
        inner = wrapped
    found = [m for m in model.modules() if isinstance(m, TransformerVQ)]
    if not found:
        raise TypeError(f"CodebookUpdateCallback found no tvq model (TransformerVQ) in the trainer's model, "
                        f"a {type(model).__name__}")
    return found


class CodebookUpdateCallback(TrainerCallback):
    """Updates tvq's codebooks after each optimizer step of a Hugging Face ``Trainer``.

    Transformer-VQ's codebooks are EMA buffers, not parameters: no optimizer moves them. Forwards in
    training mode add their key-assignment statistics to an accumulator, and
    ``TransformerVQ.update_codebooks()`` folds the statistics gathered since its last call into the
    codebooks, one EMA step per optimizer step. tvq's own trainer calls it; the ``Trainer`` does not
    know about it, so without this callback the codebooks stay frozen at their initial values::

        Trainer(model=..., args=..., callbacks=[CodebookUpdateCallback()])

    The update runs right after ``optimizer.step()`` (``on_optimizer_step``), once per optimizer step:
    with gradient accumulation the statistics of all the step's micro-batches are applied together,
    exactly the update of one batch of them all. When ``torch.distributed`` is initialized with more
    than one rank, the statistics are summed over ``process_group`` (default: every rank, the
    data-parallel group of a DDP/FSDP ``Trainer``) first, so that every rank applies the update of the
    global batch and the codebooks stay identical on all ranks. Every rank must therefore run the
    callback, as the ``Trainer`` does.

    With ``log_metrics`` (the default), each training log of the ``Trainer`` (every ``logging_steps``)
    also gets the codebook health of the latest update, as tvq's trainer logs it: ``codebook/usage``,
    ``codebook/dead``, ``codebook/entropy``, ``codebook/rel_err`` (see ``update_codebooks``). They
    are added to ``trainer.state.log_history`` and to the reporting callbacks that run after this one;
    integrations that ``report_to`` adds run before the callbacks passed to the ``Trainer``, so for them
    to report the metrics too, put this callback first:
    ``trainer.callback_handler.callbacks.insert(0, CodebookUpdateCallback())``.
    """

    def __init__(self, log_metrics: bool = True, process_group=None):
        self.log_metrics = log_metrics
        self.process_group = process_group
        self._model: nn.Module | None = None
        self._cores: list[TransformerVQ] = []
        self._metrics: list = []  # the latest update's CodebookMetrics per core model, read only when logged

    def _all_reduce(self):
        """A sum over the data-parallel ranks for ``update_codebooks(all_reduce=...)``; None for one rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) <= 1:
            return None
        group = self.process_group
        return lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise ValueError("CodebookUpdateCallback needs the trainer's model (the `model` argument of its events)")
        if model is not self._model:  # found once per model, not searched at every step
            self._model, self._cores = model, core_models(model)
        all_reduce = self._all_reduce()
        self._metrics = [m for m in (core.update_codebooks(all_reduce=all_reduce) for core in self._cores) if m]

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs):
        # a training log (it has the loss; evaluation logs have eval_loss) gets the latest update's health
        if not (self.log_metrics and self._metrics and logs is not None and "loss" in logs):
            return
        metrics: dict[str, float] = {}
        for core_metrics in self._metrics:  # the mean over core models
            for key, value in core_metrics.items():
                metrics[f"codebook/{key}"] = metrics.get(f"codebook/{key}", 0.0) + value / len(self._metrics)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)  # the Trainer stored a copy before calling us
        self._metrics = []


__all__ = ["CodebookUpdateCallback", "core_models"]
