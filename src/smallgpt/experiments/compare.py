"""`smallgpt compare CONFIG --vary optimizer=adamw,sophiag,muon`: train every variant on the same data
and budget, then write one table (Markdown and CSV) and one PNG of all loss curves."""

from __future__ import annotations

import itertools
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallgpt.config import load_config
from smallgpt.errors import UserError
from smallgpt.experiments.metrics import events, to_csv
from smallgpt.experiments.plot import draw
from smallgpt.io import atomic_write_text

COLUMNS = (
    "run",
    "seed",
    "iters",
    "final_train_loss",
    "best_train_loss",
    "final_val_loss",
    "best_val_loss",
    "final_val_bpb",
    "tokens_per_sec",
    "wall_s",
)


@dataclass
class CompareArgs:
    config: str | None = field(
        default=None, metadata={"help": "the config every variant starts from", "positional": True}
    )
    vary: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=V1,V2,...: one variant per value; repeat for every combination"},
    )
    seeds: int = field(default=1, metadata={"help": "runs per variant, with seeds seed, seed+1, ..."})
    set: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=VALUE for every run, e.g. max_iters=2000 or max_seconds=120 (repeatable)"},
    )
    out: str = field(default="runs/compare", metadata={"help": "folder for the runs, table and plot"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace runs already trained in OUT/<variant> (refused without it)"}
    )


def parse_vary(items: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise UserError(f"--vary expects KEY=V1,V2,... got {item!r}")
        axes.append((key.strip(), [v.strip() for v in values.split(",")]))
    return axes


def variants(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination of the varied values, in the order given."""
    keys = [key for key, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in axes))]


def summarize(run_dir: Path) -> dict[str, Any]:
    """The table row of one finished run, from its metrics.jsonl."""
    train, evals = events(run_dir, "train"), events(run_dir, "eval")
    if not evals:
        raise UserError(f"{run_dir} has no evaluation: set max_iters >= eval_interval or max_seconds")
    speeds = [r["tokens_per_sec"] for r in train[1:]] or [r["tokens_per_sec"] for r in train]
    return {
        "iters": evals[-1]["iter"],
        "final_train_loss": evals[-1].get("train_loss"),
        "best_train_loss": min(r["train_loss"] for r in evals if "train_loss" in r),
        "final_val_loss": evals[-1].get("val_loss"),
        "best_val_loss": min(r["val_loss"] for r in evals if "val_loss" in r),
        "final_val_bpb": evals[-1].get("val_bpb"),
        "tokens_per_sec": statistics.median(speeds) if speeds else None,
    }


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant, averaging its seeds' numbers."""
    means = []
    for name in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == name]
        mean = {"run": name, "seed": "mean"}
        for key in COLUMNS[2:]:
            values = [r[key] for r in group if r[key] is not None]
            mean[key] = statistics.fmean(values) if values else None
        means.append(mean)
    return means


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[k]) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def command_line(args: CompareArgs) -> str:
    """The command that reproduces this comparison, for the table's caption."""
    words = ["smallgpt", "compare", str(args.config)]
    words += [w for v in args.vary for w in ("--vary", v)] + [w for v in args.set for w in ("--set", v)]
    words += ["--seeds", str(args.seeds), "--out", args.out]
    return " ".join(shlex.quote(w) for w in words)


def compare(args: CompareArgs) -> list[dict[str, Any]]:
    """Train every variant x seed into OUT/<variant>/, then write OUT/compare.{md,csv,png}."""
    from smallgpt.train.run import check_out_dir, train

    if args.config is None:
        raise UserError("compare needs a config file: smallgpt compare CONFIG --vary KEY=V1,V2")
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, not {args.seeds}")
    axes = parse_vary(args.vary)
    common = [f"--{item}" for item in args.set] + (["--overwrite=true"] if args.overwrite else [])
    base_seed = load_config(args.config, common).train.seed
    out, plan, rows, runs = Path(args.out), [], [], {}
    for variant in variants(axes):  # every config is checked before the first run starts
        name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in variant.items()) or "base"
        for seed in range(base_seed, base_seed + args.seeds):
            run_dir = out / (name if args.seeds == 1 else f"{name}_seed{seed}")
            overrides = [*common, *(f"--{k}={v}" for k, v in variant.items())]
            config = load_config(args.config, [*overrides, f"--seed={seed}", f"--out_dir={run_dir}"])
            config.validate()
            check_out_dir(config)
            plan.append((name, seed, run_dir, overrides, config))
    for name, seed, run_dir, overrides, config in plan:
        print(f"== {run_dir}: {' '.join(overrides)}")
        start = time.perf_counter()
        train(config)
        rows.append({"run": name, "seed": seed, **summarize(run_dir), "wall_s": time.perf_counter() - start})
        runs[run_dir.name] = run_dir
    table = rows + (seed_means(rows) if args.seeds > 1 else [])
    atomic_write_text(out / "compare.md", f"`{command_line(args)}`\n\n" + markdown(table))
    atomic_write_text(out / "compare.csv", to_csv(table, list(COLUMNS)))
    draw(runs, out / "compare.png", title=", ".join(f"{k}: {' vs '.join(v)}" for k, v in axes))
    print(markdown(table))
    print(f"wrote {out}/compare.md, compare.csv, compare.png")
    return table
