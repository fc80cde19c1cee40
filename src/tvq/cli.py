"""The ``tvq`` command: train, eval, sample, data, bench, recall, export, plot.

Each command parses its options and calls one library function; :data:`COMMANDS` is the table of
them. Every option is checked while parsing or before any work (nothing is loaded, trained or
printed first); bad input is one line ``tvq: error: ...`` and exit code 2
(:func:`tvq.usage.run_command`). torch and the heavy modules are imported inside the command
functions, and only the chosen command's options are built, so ``--help`` and argument errors
answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from tvq.bench import run_bench
from tvq.bench.args import add_arguments as bench_options
from tvq.runtime import env_rank, tune_cpu_allocator
from tvq.training.config import DEFAULT_PRESET, PRESETS
from tvq.usage import ArgumentParser, UsageError, checkpoint_name, device_name, float_range, int_range, run_command

__all__ = ["COMMANDS", "Command", "UsageError", "main"]


@dataclass(frozen=True)
class Command:
    """A ``tvq`` command: its line in ``tvq --help``, what adds its options to its parser, and what
    runs it on the parsed options (returning the exit code)."""

    help: str
    add_options: Callable[[ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    own_help: bool = False  # unknown options point to ``tvq NAME --help``, as when it was a program of its own


def _device_option(p: ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")


def _train_options(t: ArgumentParser) -> None:
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
    _device_option(t)
    t.add_argument("--threads", type=int_range(1), help="intra-op CPU threads (default: what torch picks; "
                                                          "on a shared machine fewer can be much faster)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_train(args) -> int:
    from tvq.training.command import train_command

    train_command(preset_name=args.preset, config_file=args.config, data=args.data, out=args.out,
                  max_steps=args.max_steps, overrides=args.overrides, resume=args.resume, device=args.device,
                  threads=args.threads, progress=not args.no_progress)
    return 0


def _eval_options(e: ArgumentParser) -> None:
    e.add_argument("run_dir", help="the run directory (tvq train --out)")
    e.add_argument("--data", help="data source (default: the run's)")
    e.add_argument("--split", choices=["validation", "test"], default="validation", help="the split to score")
    e.add_argument("--checkpoint", type=checkpoint_name, default="latest", help="latest, best or a step number")
    e.add_argument("--max-tokens", type=int_range(0), default=0,
                   help="evaluate only this many tokens (default 0: the whole split)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _device_option(e)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_eval(args) -> int:
    from tvq.training.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, data=args.data,
                          max_tokens=args.max_tokens, device=args.device, progress=not args.no_progress)
    if env_rank() != 0:  # under torchrun every rank has the result: rank 0 prints it
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0


def _sample_options(s: ArgumentParser) -> None:
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
    _device_option(s)


def cmd_sample(args) -> int:
    from tvq.training.sample import sample_run

    sample_run(args.run_dir, prompt=args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               top_p=args.top_p, top_k=args.top_k, seed=args.seed, checkpoint=args.checkpoint, compile=args.compile,
               num_images=args.num_images, out=args.out, device=args.device)
    return 0


def _data_options(d: ArgumentParser) -> None:
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    v = dsub.add_parser("train-vocab", help="train a SentencePiece vocabulary on a source's training split")
    v.add_argument("source", help="pg19:DIR (writes DIR/spm32k.model), or any text source")
    v.add_argument("--vocab-size", type=int_range(260, 2**31), default=32000,
                   help="pieces, > 259 (3 control + 256 byte pieces; default 32000)")
    v.add_argument("--out", help="the .model file to write (default: DIR/spm32k.model for PG-19, "
                                 "else spm-VOCAB_SIZE.model); use it with --set tokenizer=PATH")
    info = dsub.add_parser("info", help="print the size of each split of a data source")
    info.add_argument("source", help="stdlib | FILE | DIR | enwik8 | pg19:DIR | imagenet64:DIR")


def cmd_data(args) -> int:
    from tvq.data.sources import source_info, train_vocab

    if args.data_command == "train-vocab":
        path = train_vocab(args.source, args.vocab_size, args.out)
        print(f"vocabulary written to {path}; train with --set tokenizer={path} --set model.vocab_size={args.vocab_size}")
    else:
        for line in source_info(args.source):
            print(line)
    return 0


def _recall_options(p: ArgumentParser) -> None:
    from tvq.bench.recall import add_arguments

    add_arguments(p)


def cmd_recall(args) -> int:
    from tvq.bench.recall import check_args, run

    return run(check_args(args), args.argv)


def _export_options(x: ArgumentParser) -> None:
    x.add_argument("run_dir", help="the run directory (tvq train --out)")
    x.add_argument("out_dir", help="the folder to write (must not exist)")
    x.add_argument("--checkpoint", type=checkpoint_name, default="latest", help="latest, best or a step number")


def cmd_export(args) -> int:
    try:
        from tvq.hf.export import export
    except ImportError as e:
        raise UsageError(f"tvq export needs the Hugging Face extra: pip install 'tvq[hf]' ({e})") from None
    out = export(args.run_dir, args.out_dir, args.checkpoint)
    print(f"Hugging Face model written to {out}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def _plot_options(pl: ArgumentParser) -> None:
    pl.add_argument("run_dir", help="the run directory (tvq train --out)")
    pl.add_argument("--out", help="image path (default RUN_DIR/curves.png)")


def cmd_plot(args) -> int:
    from tvq.training.plot import plot_run

    print(f"plot written to {plot_run(args.run_dir, args.out)}")
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("train a model (default: the 'small' preset on the built-in stdlib corpus)", _train_options,
                     cmd_train),
    "eval": Command("evaluate a run on a data split (bits per byte, perplexity)", _eval_options, cmd_eval),
    "sample": Command("sample text from a run, streaming tokens as they come", _sample_options, cmd_sample),
    "data": Command("data utilities", _data_options, cmd_data),
    "bench": Command("speed and memory of vq vs quadratic attention (see tvq bench --help)", bench_options,
                     run_bench, own_help=True),
    "recall": Command("long-context associative recall on a family of tasks: vq vs window-only vs dense "
                      "(--suite, --diagnose; see tvq recall --help)", _recall_options, cmd_recall, own_help=True),
    "export": Command("write a run as a Hugging Face model folder (needs tvq[hf])", _export_options, cmd_export),
    "plot": Command("draw loss and bpb curves of a run to PNG (needs tvq[plot])", _plot_options, cmd_plot),
}


def _parser(command: str | None) -> tuple[ArgumentParser, ArgumentParser | None]:
    """The ``tvq`` parser, and the parser of ``command``: the only command whose options are built."""
    p = ArgumentParser(prog="tvq", description="Transformer-VQ: train, evaluate and sample.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None
    for name, cmd in COMMANDS.items():
        parser = sub.add_parser(name, help=cmd.help)
        if name == command:
            cmd.add_options(parser)
            chosen = parser
    return p, chosen


def _run(argv: list[str]) -> int:
    """Parse ``argv`` and run the command it names."""
    parser, command_parser = _parser(next((a for a in argv if not a.startswith("-")), None))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        own = COMMANDS[args.command].own_help
        (command_parser if own else parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv[1:]  # the command's words as given (tvq recall records them)
    return COMMANDS[args.command].run(args)


def main(argv: list[str] | None = None) -> int:
    tune_cpu_allocator()
    argv = sys.argv[1:] if argv is None else argv
    return run_command(lambda: _run(argv))
