"""The ``tvq`` command: train, eval, sample, data, bench, plot, export.

Every option is checked while parsing or before any work (nothing is loaded, trained or printed
first); bad input is one line ``tvq: error: ...`` and exit code 2. torch and the heavy modules
are imported inside the command functions, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
import time
import unicodedata
from pathlib import Path

from tvq.runtime import tune_cpu_allocator
from tvq.training.config import DEFAULT_PRESET, PRESETS, apply_overrides, load_config_file, preset, set_keys
from tvq.usage import (ArgumentParser, UsageError, check_creatable, check_writable_file, checkpoint_name,
                       device_name, float_range, int_range)

__all__ = ["UsageError", "main"]


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="tvq", description="Transformer-VQ: train, evaluate and sample.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (default: the 'small' preset on the built-in stdlib corpus)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"named configuration: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    src.add_argument("--config", help="JSON file of training config keys")
    t.add_argument("--data", help="stdlib | FILE | DIR | enwik8 | pg19:DIR | imagenet64:DIR")
    t.add_argument("--out", help="run directory (default runs/PRESET-TIME)")
    t.add_argument("--max-steps", type=int_range(1), help="optimizer steps to train for")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lr=1e-3 --set model.d_model=256")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (only --max-steps and --set of "
                        "keys that do not change the computation may differ from the run's config)")
    t.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    t.add_argument("--threads", type=int_range(1), help="intra-op CPU threads (default: what torch picks; "
                                                          "on a shared machine fewer can be much faster)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a run on a data split (bits per byte, perplexity)")
    e.add_argument("run_dir", help="the run directory (tvq train --out)")
    e.add_argument("--data", help="data source (default: the run's)")
    e.add_argument("--split", choices=["validation", "test"], default="validation", help="the split to score")
    e.add_argument("--checkpoint", type=checkpoint_name, default="latest", help="latest, best or a step number")
    e.add_argument("--max-tokens", type=int_range(0), default=0,
                   help="evaluate only this many tokens (default 0: the whole split)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="sample text from a run, streaming tokens as they come")
    s.add_argument("run_dir", help="the run directory (tvq train --out)")
    s.add_argument("--prompt", default="", help="text the sample continues (default: none, a new document)")
    s.add_argument("--max-new-tokens", type=int_range(1), default=256, help="tokens to generate (default 256)")
    s.add_argument("--temperature", type=float_range(0.0), default=1.0,
                   help="softmax temperature, >= 0; 0 is greedy (default 1)")
    s.add_argument("--top-p", type=float_range(0.0, 1.0, lo_open=True), default=None,
                   help="nucleus sampling: keep the smallest set of tokens holding this much mass, in (0, 1]")
    s.add_argument("--top-k", type=int_range(1), default=None, help="keep only the k most likely tokens")
    s.add_argument("--seed", type=int_range(0), default=None, help="random seed, for a reproducible sample")
    s.add_argument("--checkpoint", type=checkpoint_name, default="latest", help="latest, best or a step number")
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step (long samples)")
    s.add_argument("--num-images", type=int_range(1, 1024), default=4, help="image models: how many images to draw")
    s.add_argument("--out", help="image models: PNG grid path (default RUN_DIR/samples.png)")
    s.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    v = dsub.add_parser("train-vocab", help="train a SentencePiece vocabulary on a source's training split")
    v.add_argument("source", help="pg19:DIR (writes DIR/spm32k.model), or any text source")
    v.add_argument("--vocab-size", type=int_range(260, 2**31), default=32000,
                   help="pieces, > 259 (3 control + 256 byte pieces; default 32000)")
    v.add_argument("--out", help="the .model file to write (default: DIR/spm32k.model for PG-19, "
                                 "else spm-VOCAB_SIZE.model); use it with --set tokenizer=PATH")
    info = dsub.add_parser("info", help="print the size of each split of a data source")
    info.add_argument("source", help="stdlib | FILE | DIR | enwik8 | pg19:DIR | imagenet64:DIR")

    sub.add_parser("bench", help="speed and memory of vq vs quadratic attention (see tvq bench --help)",
                   add_help=False)  # its own parser: tvq.bench.args
    sub.add_parser("recall", help="long-context associative recall: vq vs window-only vs dense (see tvq recall --help)",
                   add_help=False)  # its own parser: tvq.bench.recall

    x = sub.add_parser("export", help="write a run as a Hugging Face model folder (needs tvq[hf])")
    x.add_argument("run_dir", help="the run directory (tvq train --out)")
    x.add_argument("out_dir", help="the folder to write (must not exist)")
    x.add_argument("--checkpoint", type=checkpoint_name, default="latest", help="latest, best or a step number")

    pl = sub.add_parser("plot", help="draw loss and bpb curves of a run to PNG (needs tvq[plot])")
    pl.add_argument("run_dir", help="the run directory (tvq train --out)")
    pl.add_argument("--out", help="image path (default RUN_DIR/curves.png)")
    return p


def env_rank() -> int:
    """This process's rank as set by torchrun (0 when not launched by it)."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def _device(name: str | None) -> str:
    """The device to run on, checked to exist here."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available; use --device cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here; use --device cpu")
    return name


def _train_config(args):
    """The config the train command asks for, and the run directory."""
    from tvq.training.rundir import read_config, resume_config

    if args.resume and not args.out:
        raise UsageError("--resume needs --out RUN_DIR, the run to continue")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out: empty path")
    name = args.preset or (Path(args.config).stem if args.config else DEFAULT_PRESET)
    run_dir = Path(args.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a folder for the run")
    if args.resume:
        if not run_dir.is_dir():
            raise UsageError(f"--resume: {run_dir} does not exist; start a new run without --resume")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise UsageError(f"--resume: {run_dir} is not writable; a resumed run writes checkpoints there")
    else:
        check_creatable(run_dir, "--out")
    keys = set_keys(args.overrides)
    for flag, key, value in (("--max-steps", "max_steps", args.max_steps), ("--data", "data", args.data)):
        if value is not None and key in keys and keys[key].strip() != str(value):
            raise UsageError(f"{flag} {value} and --set {key}={keys[key]} disagree; give one of them")
    if args.resume and not (args.preset or args.config):  # the run's own config: --set may change only some keys
        cfg = read_config(run_dir)
    else:
        cfg = load_config_file(args.config) if args.config else preset(args.preset or DEFAULT_PRESET)
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data={args.data}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    cfg = apply_overrides(cfg, overrides)
    if args.resume:
        resume_config(cfg, run_dir)  # refuses a changed key now, before torch is loaded
    return cfg, run_dir


def cmd_train(args) -> int:
    cfg, run_dir = _train_config(args)
    device = _device(args.device)
    import torch

    from tvq.training.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    val = train(cfg, run_dir, resume=args.resume, device=device, progress=not args.no_progress)
    if env_rank() != 0:  # rank 0 reports and samples
        return 0
    print(f"validation: loss {val['loss']:.4f} nats/token, {val['bpb']:.4f} bits per byte ({val['tokens']:,} tokens)")
    if not cfg.data.startswith("imagenet64") and cfg.sample_tokens:
        print("sample:")
        model, _ = _load_for_sampling(run_dir, "latest", device)
        _stream_sample(model, run_dir, "", cfg.sample_tokens, 1.0, cfg.top_p, None, cfg.seed, device)
    print(f"run saved to {run_dir}")
    return 0


def cmd_eval(args) -> int:
    if args.data is not None and not args.data.strip():
        raise UsageError("--data is empty; name a source, or leave it out to use the run's")
    from tvq.training import checkpoint as ckpt

    path = ckpt.find_checkpoint(args.run_dir, args.checkpoint)
    device = _device(args.device)
    from tvq.data import ByteTokenizer, load_corpus
    from tvq.training.evaluate import evaluate
    from tvq.training.rundir import read_config, run_tokenizer

    run_cfg = read_config(args.run_dir)
    model, meta = ckpt.load_model(path, device)
    data = args.data or meta.get("data") or run_cfg.data
    corpus = load_corpus(data, tokenizer=run_tokenizer(args.run_dir, model.config.vocab_size))
    if corpus.vocab_size != model.config.vocab_size:
        raise UsageError(f"data {data!r} has vocabulary {corpus.vocab_size} but the checkpoint's model has "
                         f"{model.config.vocab_size}; evaluate on the data it was trained on")
    result = evaluate(model, corpus.split(args.split), segment_len=run_cfg.update_len,
                      max_tokens=args.max_tokens, byte_level=isinstance(corpus.tokenizer, ByteTokenizer),
                      device=device, progress=not args.no_progress)
    result.update(split=args.split, data=data, step=meta["step"])
    if args.json:
        import json

        print(json.dumps(result))
    else:
        print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


def _load_for_sampling(run_dir, which: str, device):
    from tvq.training import checkpoint as ckpt

    return ckpt.load_model(ckpt.find_checkpoint(run_dir, which), device)


_BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters other than newline and tab, and the
    bidirectional controls, written as escapes (``\\x1b``), so a sample cannot drive the terminal."""
    def safe(ch: str) -> str:
        if ch in "\n\t" or (unicodedata.category(ch) != "Cc" and ch not in _BIDI_CONTROLS):
            return ch
        return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"

    return "".join(map(safe, text))


def _stream_sample(model, run_dir, prompt, max_new_tokens, temperature, top_p, top_k, seed, device,
                   compile: bool = False) -> None:
    import codecs

    import torch

    from tvq.data import ByteTokenizer
    from tvq.training.batches import DOC_START
    from tvq.training.rundir import run_tokenizer

    tokenizer = run_tokenizer(run_dir, model.config.vocab_size) or ByteTokenizer()
    ids = [DOC_START] + tokenizer.encode(prompt)  # a sample starts a new document
    input_ids = torch.tensor([ids], device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    byte_level = isinstance(tokenizer, ByteTokenizer)
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character gets an escape
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout.write(printable(prompt))
    generated: list[int] = []
    for token in model.stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed, compile=compile):
        generated.append(int(token[0]))
        if byte_level:
            sys.stdout.write(printable(decoder.decode(bytes([generated[-1]]))))
        sys.stdout.flush()
    if not byte_level:
        sys.stdout.write(printable(tokenizer.decode(generated)))
    sys.stdout.write(printable(decoder.decode(b"", final=True)) + "\n")


def _sample_images(model, args, device) -> None:
    import torch
    from tqdm import tqdm

    from tvq.data import TOKENS_PER_IMAGE, save_image_grid, tokens_to_image
    from tvq.training.batches import DOC_START

    start = torch.full((args.num_images, 1), DOC_START, device=device)
    stream = model.stream(start, TOKENS_PER_IMAGE, args.temperature, args.top_k, args.top_p, args.seed,
                          compile=args.compile)
    tokens = torch.stack(list(tqdm(stream, total=TOKENS_PER_IMAGE, unit="tok", desc="sampling")), 1)
    out = Path(args.out or Path(args.run_dir) / "samples.png")
    save_image_grid([tokens_to_image(t.cpu().numpy()) for t in tokens], out)
    print(f"{args.num_images} images written to {out}")


def cmd_sample(args) -> int:
    from tvq.training import checkpoint as ckpt

    path = ckpt.find_checkpoint(args.run_dir, args.checkpoint)
    meta = ckpt.load_meta(path)
    images = meta.get("data", "").startswith("imagenet64")
    if images:
        if importlib.util.find_spec("PIL") is None:
            raise UsageError("sampling images needs pillow: pip install 'tvq[images]'")
        out = Path(args.out or Path(args.run_dir) / "samples.png")
        if out.suffix.lower() != ".png":
            raise UsageError(f"--out must be a .png path, got {out}")
        check_writable_file(out, "--out")
    elif args.out:
        raise UsageError("--out is for image models; a text sample is printed")
    device = _device(args.device)
    model, meta = ckpt.load_model(path, device)
    if images:
        _sample_images(model, args, device)
        return 0
    from tvq.training.rundir import run_tokenizer

    run_tokenizer(args.run_dir, model.config.vocab_size)  # checked before anything is printed
    _stream_sample(model, args.run_dir, args.prompt, args.max_new_tokens, args.temperature,
                   args.top_p, args.top_k, args.seed, device, compile=args.compile)
    return 0


def cmd_data(args) -> int:
    from tvq.data import load_corpus

    if args.data_command == "train-vocab":
        if importlib.util.find_spec("sentencepiece") is None:
            raise UsageError("tvq data train-vocab needs sentencepiece: pip install 'tvq[sentencepiece]'")
        from tvq.data import train_pg19_vocab, train_sentencepiece

        if args.source.startswith("imagenet64:"):
            raise UsageError("train-vocab needs a text source; images are always 256 intensity tokens")
        pg19 = args.source.startswith("pg19:")
        out = Path(args.out) if args.out else (Path(args.source[5:]) / "spm32k.model" if pg19
                                               else Path(f"spm-{args.vocab_size}.model"))
        if out.suffix != ".model":
            raise UsageError(f"--out must end in .model, got {out}")
        check_writable_file(out, "--out")
        if pg19:
            path = train_pg19_vocab(args.source.split(":", 1)[1], vocab_size=args.vocab_size, output=args.out)
        else:
            import tempfile

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
    from tvq.training.rundir import read_metrics

    if not Path(args.run_dir).is_dir():
        raise UsageError(f"run directory {args.run_dir} does not exist")
    out = Path(args.out or Path(args.run_dir) / "curves.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = plt.figure().canvas.get_supported_filetypes()
    if out.suffix.lower().lstrip(".") not in kinds:
        raise UsageError(f"--out {out}: the image type is given by its suffix, one of .{', .'.join(sorted(kinds))}")
    check_writable_file(out, "--out")
    records, damaged = read_metrics(args.run_dir)
    train = [r for r in records if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("bpb"), (int, float))]
    val = [r for r in records if isinstance(r.get("val/bpb"), (int, float))]
    if not train and not val:
        raise UsageError(f"{Path(args.run_dir) / 'metrics.jsonl'} holds no loss records to plot")
    if damaged:
        print(f"tvq: warning: skipped {damaged} damaged line(s) of {Path(args.run_dir) / 'metrics.jsonl'}",
              file=sys.stderr)
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
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot written to {out}")
    return 0


def cmd_export(args) -> int:
    try:
        from tvq.hf.export import export
    except ImportError as e:
        raise UsageError(f"tvq export needs the Hugging Face extra: pip install 'tvq[hf]' ({e})") from None
    out = export(args.run_dir, args.out_dir, args.checkpoint)
    print(f"Hugging Face model written to {out}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def cmd_bench(argv: list[str]) -> int:
    from tvq.bench.args import parse_args

    args = parse_args(argv)  # every option checked before torch is imported
    from tvq.bench.runner import run

    return run(args)


def cmd_recall(argv: list[str]) -> int:
    from tvq.bench.recall import main as recall_main

    return recall_main(argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "data": cmd_data, "plot": cmd_plot,
            "export": cmd_export}


def _os_error(e: OSError) -> str:
    """One line for a failed file operation: what, where, and for a full or read-only disk what to do."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    text = f"{e.strerror or e}" + (f": {where}" if where else "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += "; free some space (the last complete checkpoint is intact)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        text += "; choose a writable location"
    return text


def main(argv: list[str] | None = None) -> int:
    tune_cpu_allocator()
    argv = sys.argv[1:] if argv is None else argv
    try:
        own_parser = {"bench": cmd_bench, "recall": cmd_recall}.get(argv[0] if argv else "")
        if own_parser:
            return own_parser(argv[1:])
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader of stdout went away (tvq sample ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, ImportError, OSError, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and type(e).__name__ != "OutOfMemoryError":
            raise  # a bug or a failed collective: the traceback is the report
        if isinstance(e, (MemoryError, RuntimeError)):
            message = "out of memory; use a smaller model, batch_size or update_len, or more grad_accum"
        elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError) or (
                isinstance(e, FileNotFoundError) and e.filename is not None):
            message = _os_error(e)
        else:
            message = str(e)
        message = " ".join(line.strip() for line in message.splitlines() if line.strip())
        rank = env_rank()
        print(f"tvq: error: {message}" if rank == 0 else f"tvq: error (rank {rank}): {message}", file=sys.stderr)
        if rank != 0:  # torchrun stops every worker once one fails: let rank 0 report first (a loaded
            time.sleep(30)  # machine can hold it back for seconds; torchrun ends this wait once rank 0 exits)
        return 2
    except KeyboardInterrupt:
        print("tvq: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
