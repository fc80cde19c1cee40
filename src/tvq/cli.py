"""The ``tvq`` command: train, eval, sample, data, plot."""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from tvq.runtime import tune_cpu_allocator
from tvq.training.batches import DOC_START
from tvq.training.config import DEFAULT_PRESET, PRESETS, apply_overrides, load_config_file, preset
from tvq.training.distributed import env_rank


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvq", description="Transformer-VQ: train, evaluate and sample.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: the 'small' preset on the built-in stdlib corpus)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"named configuration: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    src.add_argument("--config", help="JSON file of training config keys")
    t.add_argument("--data", help="stdlib | FILE | DIR | enwik8 | pg19:DIR | imagenet64:DIR")
    t.add_argument("--out", help="run directory (default runs/PRESET-TIME)")
    t.add_argument("--max-steps", type=int, help="optimizer steps to train for")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lr=1e-3 --set model.d_model=256")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a run on a data split (bits per byte, perplexity)")
    e.add_argument("run_dir")
    e.add_argument("--data", help="data source (default: the run's)")
    e.add_argument("--split", choices=["validation", "test"], default="validation")
    e.add_argument("--checkpoint", default="latest", help="latest, best or a step number")
    e.add_argument("--max-tokens", type=int, default=0, help="evaluate only this many tokens (0: whole split)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device")

    s = sub.add_parser("sample", help="sample text from a run, streaming tokens as they come")
    s.add_argument("run_dir")
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--checkpoint", default="latest")
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step (long samples)")
    s.add_argument("--num-images", type=int, default=4, help="image models: how many images to draw")
    s.add_argument("--out", help="image models: PNG grid path (default RUN_DIR/samples.png)")
    s.add_argument("--device")

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    v = dsub.add_parser("train-vocab", help="train a SentencePiece vocabulary on a source's training split")
    v.add_argument("source", help="pg19:DIR (writes DIR/spm32k.model), or any text source")
    v.add_argument("--vocab-size", type=int, default=32000)
    v.add_argument("--out", help="the .model file to write (default: DIR/spm32k.model for PG-19, "
                                 "else spm-VOCAB_SIZE.model); use it with --set tokenizer=PATH")
    info = dsub.add_parser("info", help="print the size of each split of a data source")
    info.add_argument("source")

    sub.add_parser("bench", help="speed and memory of vq vs quadratic attention (see tvq bench --help)",
                   add_help=False)  # its own parser: tvq.bench.runner
    sub.add_parser("recall", help="long-context associative recall: vq vs window-only vs dense (see tvq recall --help)",
                   add_help=False)  # its own parser: tvq.bench.recall

    pl = sub.add_parser("plot", help="draw loss and bpb curves of a run to PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    return p


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    return name


def cmd_train(args) -> int:
    from tvq.training.trainer import CONFIG_FILE, train

    if args.resume and not args.out:
        raise UsageError("--resume needs --out RUN_DIR, the run to continue")
    saved = Path(args.out or ".") / CONFIG_FILE
    if args.resume and saved.is_file():  # the run's own config: only --set of RESUMABLE_KEYS changes it
        cfg = load_config_file(saved)
    else:
        cfg = load_config_file(args.config) if args.config else preset(args.preset or DEFAULT_PRESET)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data={args.data}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    cfg = apply_overrides(cfg, overrides)
    name = args.preset or (Path(args.config).stem if args.config else DEFAULT_PRESET)
    run_dir = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    val = train(cfg, run_dir, resume=args.resume, device=_device(args.device), progress=not args.no_progress)
    if env_rank() != 0:  # rank 0 reports and samples
        return 0
    print(f"validation: loss {val['loss']:.4f} nats/token, {val['bpb']:.4f} bits per byte ({val['tokens']:,} tokens)")
    if not cfg.data.startswith("imagenet64") and cfg.sample_tokens:
        print("sample:")
        device = _device(args.device)
        model, _ = _load_for_sampling(run_dir, "latest", device)
        _stream_sample(model, run_dir, "", cfg.sample_tokens, 1.0, cfg.top_p, None, cfg.seed, device)
    print(f"run saved to {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from tvq.data import ByteTokenizer, load_corpus
    from tvq.training import checkpoint as ckpt
    from tvq.training.evaluate import evaluate
    from tvq.training.trainer import run_tokenizer

    path = ckpt.find_checkpoint(args.run_dir, args.checkpoint)
    device = _device(args.device)
    model, meta = ckpt.load_model(path, device)
    data = args.data or meta.get("data", "stdlib")
    corpus = load_corpus(data, tokenizer=run_tokenizer(args.run_dir))
    if corpus.vocab_size != model.config.vocab_size:
        raise UsageError(f"data {data!r} has vocabulary {corpus.vocab_size} but the checkpoint's model has "
                         f"{model.config.vocab_size}; evaluate on the data it was trained on")
    run_cfg = json.loads((Path(args.run_dir) / "config.json").read_text())
    result = evaluate(model, corpus.split(args.split), segment_len=run_cfg.get("update_len", 2048),
                      max_tokens=args.max_tokens, byte_level=isinstance(corpus.tokenizer, ByteTokenizer),
                      device=device)
    result.update(split=args.split, data=data, step=meta["step"])
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


def _load_for_sampling(run_dir, which: str, device):
    from tvq.training import checkpoint as ckpt

    return ckpt.load_model(ckpt.find_checkpoint(run_dir, which), device)


def _stream_sample(model, run_dir, prompt, max_new_tokens, temperature, top_p, top_k, seed, device,
                   compile: bool = False) -> None:
    from tvq.data import ByteTokenizer
    from tvq.training.trainer import run_tokenizer

    tokenizer = run_tokenizer(run_dir) or ByteTokenizer()
    ids = [DOC_START] + tokenizer.encode(prompt)  # a sample starts a new document
    input_ids = torch.tensor([ids], device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    byte_level = tokenizer.vocab_size == 256
    sys.stdout.write(prompt)
    generated: list[int] = []
    for token in model.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, compile=compile):
        generated.append(int(token[0]))
        if byte_level:
            sys.stdout.write(decoder.decode(bytes([generated[-1]])))
        sys.stdout.flush()
    if not byte_level:
        sys.stdout.write(tokenizer.decode(generated))
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")


def _sample_images(model, args, device) -> None:
    from tqdm import tqdm

    from tvq.data import TOKENS_PER_IMAGE, save_image_grid, tokens_to_image

    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    start = torch.full((args.num_images, 1), DOC_START, device=device)
    stream = model.stream(start, TOKENS_PER_IMAGE, args.temperature, args.top_k, args.top_p, args.seed,
                          compile=args.compile)
    tokens = torch.stack(list(tqdm(stream, total=TOKENS_PER_IMAGE, unit="tok", desc="sampling")), 1)
    out = Path(args.out or Path(args.run_dir) / "samples.png")
    save_image_grid([tokens_to_image(t.cpu().numpy()) for t in tokens], out)
    print(f"{args.num_images} images written to {out}")


def cmd_sample(args) -> int:
    device = _device(args.device)
    model, meta = _load_for_sampling(args.run_dir, args.checkpoint, device)
    if meta.get("data", "").startswith("imagenet64"):
        _sample_images(model, args, device)
        return 0
    _stream_sample(model, args.run_dir, args.prompt, args.max_new_tokens, args.temperature,
                   args.top_p, args.top_k, args.seed, device, compile=args.compile)
    return 0


def cmd_data(args) -> int:
    from tvq.data import load_corpus

    if args.data_command == "train-vocab":
        from tvq.data import train_pg19_vocab, train_sentencepiece

        if args.vocab_size < 2:
            raise UsageError(f"--vocab-size must be >= 2, got {args.vocab_size}")
        if args.source.startswith("pg19:"):
            path = train_pg19_vocab(args.source.split(":", 1)[1], vocab_size=args.vocab_size, output=args.out)
        elif args.source.startswith("imagenet64:"):
            raise UsageError("train-vocab needs a text source; images are always 256 intensity tokens")
        else:
            out = Path(args.out or f"spm-{args.vocab_size}.model")
            if out.suffix != ".model":
                raise UsageError(f"--out must end in .model, got {out}")
            train = load_corpus(args.source).split("train")
            with tempfile.TemporaryDirectory() as tmp:
                text = Path(tmp) / "train.txt"
                text.write_bytes(train.tokens.tobytes())
                train_sentencepiece([text], out.with_suffix(""), args.vocab_size)
            path = out
        print(f"vocabulary written to {path}; train with --set tokenizer={path} --set model.vocab_size={args.vocab_size}")
        return 0
    corpus = load_corpus(args.source)
    for name, split in corpus.splits.items():
        print(f"{name}: {len(split.tokens):,} tokens, {split.n_docs:,} documents, {split.n_bytes:,} bytes")
    return 0


def cmd_plot(args) -> int:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("tvq plot needs matplotlib: pip install 'tvq[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(args.run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"{path} not found; is {args.run_dir} a tvq run directory?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val/bpb" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax1.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax2.plot([r["step"] for r in train], [r["bpb"] for r in train], label="train")
    if val:
        ax2.plot([r["step"] for r in val], [r["val/bpb"] for r in val], "o-", label="validation")
    ax2.set(xlabel="step", ylabel="bits per byte", title="bpb")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    out = Path(args.out or Path(args.run_dir) / "curves.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot written to {out}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from tvq.bench.runner import main as bench_main

    return bench_main(argv)


def cmd_recall(argv: list[str]) -> int:
    from tvq.bench.recall import main as recall_main

    return recall_main(argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "data": cmd_data, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    tune_cpu_allocator()
    argv = sys.argv[1:] if argv is None else argv
    own_parser = {"bench": cmd_bench, "recall": cmd_recall}.get(argv[0] if argv else "")
    args = None if own_parser else _parser().parse_args(argv)
    try:
        return own_parser(argv[1:]) if own_parser else COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        rank = env_rank()
        print(f"tvq: error: {e}" if rank == 0 else f"tvq: error (rank {rank}): {e}", file=sys.stderr)
        if rank != 0:  # torchrun stops every worker once one fails: let rank 0 report first
            time.sleep(5)
        return 2
    except KeyboardInterrupt:
        print("tvq: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
