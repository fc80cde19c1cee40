"""Loss and bits-per-byte curves of a run drawn to an image (``tvq plot``; needs matplotlib)."""

from __future__ import annotations

import sys
from pathlib import Path

from tvq.training.rundir import METRICS_FILE, read_metrics
from tvq.usage import UsageError, check_writable_file


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the training loss and the training and validation bpb of RUN/metrics.jsonl side by side
    to ``out`` (default RUN/curves.png; the image type is the suffix's); returns the path written.
    Damaged lines of the file are skipped with a warning on stderr."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("tvq plot needs matplotlib: pip install 'tvq[plot]'") from None
    if not Path(run_dir).is_dir():
        raise UsageError(f"run directory {run_dir} does not exist")
    out = Path(out or Path(run_dir) / "curves.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = plt.figure()
    kinds = probe.canvas.get_supported_filetypes()
    plt.close(probe)
    if out.suffix.lower().lstrip(".") not in kinds:
        raise UsageError(f"--out {out}: the image type is given by its suffix, one of .{', .'.join(sorted(kinds))}")
    check_writable_file(out, "--out")
    records, damaged = read_metrics(run_dir)
    train = [r for r in records if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("bpb"), (int, float))]
    val = [r for r in records if isinstance(r.get("val/bpb"), (int, float))]
    if not train and not val:
        raise UsageError(f"{Path(run_dir) / METRICS_FILE} holds no loss records to plot")
    if damaged:
        print(f"tvq: warning: skipped {damaged} damaged line(s) of {Path(run_dir) / METRICS_FILE}", file=sys.stderr)
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
    plt.close(fig)
    return out
