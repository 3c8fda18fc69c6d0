"""`smallgpt plot RUN...`: train and validation loss (and lr) of one or many runs in one PNG."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallgpt.errors import UserError
from smallgpt.experiments.metrics import events
from smallgpt.io import atomic_write_bytes


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib (or smallgpt[plot])") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def draw(runs: dict[str, Path], out: Path, x: str = "iter", lr: bool = False, title: str = "") -> None:
    """One PNG: per run, its train loss (thin line) and val loss (dots) in one colour."""
    if x not in ("iter", "tokens"):
        raise UserError(f"--x must be iter or tokens, not {x!r}")
    plt = pyplot()
    panels = 2 if lr else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 4.5 * panels), squeeze=False, sharex=True)
    loss_ax = axes[0][0]
    for n, (label, run_dir) in enumerate(runs.items()):
        color = f"C{n % 10}"
        train, evals = events(run_dir, "train"), events(run_dir, "eval")
        if not train and not evals:
            raise UserError(f"{run_dir}/metrics.jsonl has no train or eval records to plot")
        loss_ax.plot([r[x] for r in train], [r["loss"] for r in train], color=color, lw=0.8, alpha=0.5)
        points = [r for r in evals if "val_loss" in r]
        loss_ax.plot(
            [r[x] for r in points], [r["val_loss"] for r in points], "o-", color=color, ms=3, label=label
        )
        if lr:
            axes[1][0].plot([r[x] for r in train], [r["lr"] for r in train], color=color, label=label)
    loss_ax.set_ylabel("loss (line: train, dots: val)")
    loss_ax.set_title(title)
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    if lr:
        axes[1][0].set_ylabel("learning rate")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("iteration" if x == "iter" else "tokens")
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def labels(run_dirs: list[str]) -> dict[str, Path]:
    """Run folders by their names, or their paths where two share a name."""
    names = [Path(r).name for r in run_dirs]
    return {(Path(r).name if names.count(Path(r).name) == 1 else r): Path(r) for r in run_dirs}


@dataclass
class PlotArgs:
    runs: list[str] = field(
        default_factory=list, metadata={"help": "run folders (each with metrics.jsonl)", "positional": True}
    )
    x: str = field(default="iter", metadata={"help": "x axis: iter or tokens"})
    lr: bool = field(default=False, metadata={"help": "add a panel with the learning rate"})
    out: str | None = field(default=None, metadata={"help": "PNG to write (default: FIRST_RUN/loss.png)"})


def plot(args: PlotArgs) -> Path:
    if not args.runs:
        raise UserError("plot needs at least one run folder: smallgpt plot RUN_DIR [RUN_DIR ...]")
    out = Path(args.out or Path(args.runs[0]) / "loss.png")
    draw(labels(args.runs), out, args.x, args.lr)
    print(f"wrote {out}")
    return out
