"""``tvq train`` as a function: the run its options ask for, trained, then its validation result and
a text sample printed."""

from __future__ import annotations

from collections.abc import Sequence

from tvq.runtime import env_rank
from tvq.training.rundir import config_from_options
from tvq.usage import check_device


def train_command(*, preset_name: str | None = None, config_file: str | None = None, data: str | None = None,
                  out: str | None = None, max_steps: int | None = None, overrides: Sequence[str] = (),
                  resume: bool = False, device: str | None = None, threads: int | None = None,
                  progress: bool = True) -> dict:
    """Train the run of these ``tvq train`` options (:func:`~tvq.training.rundir.config_from_options`)
    on ``device`` (default: cuda when available) with ``threads`` intra-op CPU threads; rank 0 then
    prints the validation result, a sample of ``sample_tokens`` tokens and where the run is. Returns
    the final validation metrics."""
    cfg, run_dir = config_from_options(preset_name=preset_name, config_file=config_file, overrides=overrides,
                                       data=data, max_steps=max_steps, out=out, resume=resume)
    device = check_device(device)
    import torch  # with the training modules, only once the options are accepted: bad input answers at once

    from tvq.training import checkpoint as ckpt
    from tvq.training.sample import stream_text
    from tvq.training.trainer import train

    if threads:
        torch.set_num_threads(threads)
    val = train(cfg, run_dir, resume=resume, device=device, progress=progress)
    if env_rank() != 0:  # rank 0 reports and samples
        return val
    print(f"validation: loss {val['loss']:.4f} nats/token, {val['bpb']:.4f} bits per byte ({val['tokens']:,} tokens)")
    if not cfg.data.startswith("imagenet64") and cfg.sample_tokens:
        print("sample:")
        model, _ = ckpt.load_model(ckpt.find_checkpoint(run_dir, "latest"), device)
        stream_text(model, run_dir, "", cfg.sample_tokens, 1.0, cfg.top_p, None, cfg.seed, device)
    print(f"run saved to {run_dir}")
    return val
