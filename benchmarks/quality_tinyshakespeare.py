"""Quality benchmark: Transformer-VQ vs dense attention vs no cache, on tinyshakespeare (CPU).

Trains three models of the same size for the same steps on the same batches (byte-level, first
90% of ../shared/data/tinyshakespeare.txt for training, last 10% for validation):

- ``vq``: Transformer-VQ (window + compressive cache);
- ``full``: the same layers with dense causal attention over unquantized keys;
- ``vq-nocache``: Transformer-VQ with ``agg_cache=False``, a pure sliding window of ``mem_len``.

Training sequences (``sequence_len``) are 16x the window, so the cache has something to add.
Every model is scored on the whole validation split in sequences of ``sequence_len`` tokens
(same context for all); ``vq`` is also scored streaming the split with its state carried across.
Writes benchmarks/results/quality_tinyshakespeare.{json,png} and prints a Markdown table.

    python benchmarks/quality_tinyshakespeare.py [--steps 1000] [--out benchmarks/results] [--seed 0]

``--seed`` seeds the weights and the batches; ``--config FILE`` (a JSON dict of model config keys,
e.g. benchmarks/recall_config.json) and ``--set model.KEY=VALUE`` change the two vq variants;
``--variants`` picks the models; ``--data stdlib`` runs the same comparison on the built-in corpus of
Python's standard library (its own validation split); ``--name`` names the output files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from tvq.data import load_corpus
from tvq.training import checkpoint as ckpt
from tvq.training.config import apply_overrides, preset
from tvq.training.evaluate import evaluate
from tvq.training.trainer import METRICS_FILE, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
VARIANTS = {"vq": [], "full": ["model.attention=full"], "vq-nocache": ["model.agg_cache=false"]}
VQ_VARIANTS = ("vq", "vq-nocache")  # the ones --config and --set change


def split_corpus(tmp: Path) -> str:
    """A folder with train/ and validation/ holding the first 90% and last 10% of the text."""
    text = DATA.read_bytes()
    cut = len(text) * 9 // 10
    for name, part in (("train", text[:cut]), ("validation", text[cut:])):
        (tmp / name).mkdir(parents=True)
        (tmp / name / "tinyshakespeare.txt").write_bytes(part)
    return str(tmp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--config", help="JSON dict of model config keys for the vq variants")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="model config override for the vq variants")
    p.add_argument("--data", default="tinyshakespeare", choices=["tinyshakespeare", "stdlib"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="", help="output files: quality_NAME.{json,png} (default: quality_DATA)")
    args = p.parse_args()
    names = args.variants.split(",")
    if not names or any(n not in VARIANTS for n in names):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    tools = [] if not args.config else [f"model.{k}={v}" for k, v in json.loads(Path(args.config).read_text()).items()]
    tools += args.overrides
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quality_" + (args.name or args.data)
    tmp = Path(tempfile.mkdtemp(prefix="tvq-quality-"))
    try:
        data = split_corpus(tmp / "data") if args.data == "tinyshakespeare" else "stdlib"
        val_split = load_corpus(data).split("validation")
        results, curves = {}, {}
        for name in names:
            extra = VARIANTS[name] + (tools if name in VQ_VARIANTS else [])
            cfg = apply_overrides(preset("small"), [
                f"data={data}", f"max_steps={args.steps}", "sequence_len=1024", "update_len=256",
                "model.block_len=64", "model.mem_len=64", "eval_every=100", "eval_tokens=16384",
                "save_every=100000", "sample_tokens=0", f"seed={args.seed}", *extra,
            ])
            run = tmp / name
            t0 = time.perf_counter()
            train(cfg, run, progress=False, log=lambda *a: None)
            seconds = time.perf_counter() - t0
            model = ckpt.load_model(ckpt.find_checkpoint(run))[0]
            same_ctx = evaluate(model, val_split, segment_len=256, reset_every=cfg.sequence_len)
            results[name] = {"val_bpb": same_ctx["bpb"], "val_tokens": same_ctx["tokens"],
                             "train_seconds": seconds, "parameters": model.num_parameters(),
                             "overrides": extra}
            if model.attns[0].cache_bias is not None:  # the learned offsets, per GAU and head
                results[name]["cache_bias"] = [g.cache_bias.tolist() for g in model.attns]
            if name == "vq":
                results[name]["val_bpb_streaming"] = evaluate(model, val_split, segment_len=256)["bpb"]
            records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
            curves[name] = [(r["step"], r["val/bpb"]) for r in records if "val/bpb" in r]
            print(f"{name}: validation bpb {same_ctx['bpb']:.4f} ({seconds:.0f}s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    meta = {"command": "python benchmarks/quality_tinyshakespeare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "preset": "small", "steps": args.steps, "sequence_len": 1024, "update_len": 256,
            "block_len": 64, "mem_len": 64, "batch_size": 8, "seed": args.seed, "data": args.data,
            "threads": args.threads, "torch": torch.__version__, "load_average": os.getloadavg()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results,
                                                                  "curves": curves}, indent=2))
    print("\n| model | validation bpb (1024-token context) | train time |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['val_bpb']:.4f} | {r['train_seconds']:.0f} s |")
    if "vq" in results:
        print(f"\nvq streaming the whole validation split with its state: {results['vq']['val_bpb_streaming']:.4f} bpb")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'tvq[plot]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot(*zip(*pts), marker="o", ms=3, label=name)
    ax.set(xlabel="step", ylabel="validation bpb (first 16k bytes, streamed)",
           title=f"{args.data}, byte-level, same steps, seed {args.seed}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
