"""The best model per CPU-minute: a fixed training wall-clock from scratch, and the val loss it buys.

    python benchmarks/speedrun_cpu.py [--track shakespeare|chinese|all] [--seconds 180] [--repeats 3]
        [--variant NAME:--key=value,--key=value ...] [--out DIR]

Tracks (char tokenizers, a fixed val split, prepared once into --out):
- shakespeare: tiny shakespeare, the last 10% as val (nanoGPT's split);
- chinese: 西游记, Lu Xun, the Chinese Wikipedia and Common Voice sentences (../shared/data), cut
  into documents of about 2,000 characters with a seeded 10% held out, so val reads every source.

Rows, each in a fresh process on `--threads` threads, alternating row by row within each repeat:
- `nanoGPT itself`: benchmarks/nanogpt_baseline.py, its quick start as it is (2000 iterations);
- `nanoGPT config`: configs/nanogpt_cpu_quickstart.yaml in smallgpt, given the whole budget
  (its cosine stretched over it);
- `recipe`: the track's config (configs/shakespeare_char_cpu.yaml, configs/chinese_char_cpu.yaml);
- one row per `--variant`: the recipe with those overrides (the ablations).
Training time excludes evaluation, as nanoGPT's timing does, and includes torch.compile's (cold
cache) compile time for rows that compile (a one-step probe measures it; the run trains for the
budget less that). Every smallgpt run's last checkpoint is
then scored on the WHOLE val split (windows of the model's block_size, each token once) so that rows
compare without eval_iters' sampling noise; the table gives medians over the repeats, the val delta
against the recipe, bits per byte, training tokens/s, and writes every run's eval curve to
`--out/curves.csv` (and `curves.png` with matplotlib). Run it alone: `flock /tmp/smallgpt-bench.lock ...`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import SHARED_DATA, machine, markdown_table, today

from smallgpt.config import load_config
from smallgpt.data.loader import open_split
from smallgpt.data.tokenizers import EOT
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.runs import load_run
from smallgpt.train import checkpoint

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CONFIG = REPO / "configs" / "nanogpt_cpu_quickstart.yaml"
# the rows every track starts with (None: nanoGPT's own script); --skip leaves one out
BASELINES: dict[str, tuple[Path, list[str]] | None] = {
    "nanoGPT itself": None,
    "nanoGPT config": (NANOGPT_CONFIG, ["--max_iters=100000000", "--lr_decay_by=seconds"]),
}
CHINESE_SOURCES = [
    "chinese_novel/xiyouji.txt",
    "luxun/luxun_stories_essays.txt",
    "chinese_wiki/wiki_sentences_zh_cn.txt",
    "chinese_wiki/sentence_collector_zh_cn.txt",
    "chinese_wiki/cn_chat_sentences_zh_cn.txt",
]
DOCUMENT_CHARS = 2000


TRACKS = {
    "shakespeare": REPO / "configs" / "shakespeare_char_cpu.yaml",
    "chinese": REPO / "configs" / "chinese_char_cpu.yaml",
}


def chinese_corpus(path: Path) -> None:
    """The Chinese prose as documents of about DOCUMENT_CHARS characters, cut at line ends and
    separated by end-of-text markers, so prepare's seeded document split draws val from every source."""
    documents: list[str] = []
    for name in CHINESE_SOURCES:
        lines, size = [], 0
        for line in (SHARED_DATA / name).read_text(encoding="utf-8").splitlines(keepends=True):
            lines.append(line)
            size += len(line)
            if size >= DOCUMENT_CHARS:
                documents.append("".join(lines))
                lines, size = [], 0
        if lines:
            documents.append("".join(lines))
    path.write_text(EOT.join(documents), encoding="utf-8")


def prepare_track(name: str, out: Path) -> Path:
    data = out / f"data_{name}"
    if (data / "meta.json").is_file():
        return data
    if name == "shakespeare":
        source = SHARED_DATA / "tinyshakespeare" / "input.txt"
    else:
        source = out / "chinese_prose.txt"
        chinese_corpus(source)
    run_prepare(PrepareArgs(input=str(source), out=str(data)))
    return data


def full_val_loss(run_dir: Path, data: Path) -> float:
    """Mean next-token loss of the run's last checkpoint over every token of val.bin, read in
    windows of block_size (each token scored once, with the context its window gives it)."""
    model, _ = load_run(run_dir, torch.device("cpu"), "last")
    meta = json.loads((data / "meta.json").read_text())
    tokens = torch.from_numpy(np.asarray(open_split(data, "val", meta["dtype"]), dtype=np.int64))
    block = model.config.block_size
    usable = (len(tokens) - 1) // block * block
    x = tokens[:usable].view(-1, block)
    y = tokens[1 : usable + 1].view(-1, block)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), 64):
            _, loss = model(x[start : start + 64], y[start : start + 64])
            total += loss.item() * len(x[start : start + 64])
    return total / len(x)


def bits_per_byte(loss: float, data: Path) -> float:
    counts = json.loads((data / "meta.json").read_text())["counts"]
    return loss / math.log(2) * counts["tokens"]["val"] / counts["bytes"]["val"]


def smallgpt_train(
    row: str, config: Path, overrides: list[str], data: Path, run_dir: Path, seconds: float, args
) -> float:
    """Train in a fresh process with a cold torch.compile cache, as a user's first run has; returns
    the seconds its first step spent compiling (0 without compile)."""
    command = [sys.executable, "-m", "smallgpt", "train", str(config), f"--dataset={data}"]
    command += [f"--out_dir={run_dir}", f"--max_seconds={seconds}", "--progress=false", *overrides]
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own run of the previous call
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TORCHINDUCTOR_CACHE_DIR": cache}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{row} failed:\n{done.stderr[-3000:]}")
    compiled = re.search(r"compiled the model in ([0-9.]+) s", done.stdout + done.stderr)
    return float(compiled.group(1)) if compiled else 0.0


def train_once(row: str, config: Path, overrides: list[str], data: Path, run_dir: Path, args) -> dict:
    """One smallgpt run in a fresh process; its speed, its curve and its whole-val loss.

    The trainer leaves the compiling step out of max_seconds, but compiling is part of a user's
    budget: a compiled row first measures its (cold) compile time in a one-step probe and then
    trains for the budget less that time."""
    seconds = args.seconds
    if load_config(config, overrides).train.compile:
        probe = ["--max_iters=1", "--eval_interval=1000", "--eval_iters=1"]
        seconds -= smallgpt_train(row, config, [*overrides, *probe], data, run_dir, seconds, args)
    compile_seconds = smallgpt_train(row, config, overrides, data, run_dir, seconds, args)
    state = checkpoint.load_state(run_dir / "ckpt" / "last")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = full_val_loss(run_dir, data)
    return {
        "iters": state["iter_num"],
        "train_seconds": state["train_seconds"] + compile_seconds,
        "compile_seconds": compile_seconds,
        "tokens_per_sec": state["tokens_seen"] / (state["train_seconds"] + compile_seconds),
        "val_loss": loss,
        "val_bpb": bits_per_byte(loss, data),
        "curve": [(e["iter"], e["tokens"], e["val_loss"]) for e in events if e["event"] == "eval"],
    }


def nanogpt_once(data: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, str(REPO / "benchmarks" / "nanogpt_baseline.py"), "--data", str(data)]
    command += ["--max_iters", str(args.nanogpt_iters)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"nanoGPT failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    loss = result["val_loss"]  # nanoGPT's own estimate (eval_iters batches): its checkpoint format differs
    return {
        "iters": result["iterations"],
        "train_seconds": result["train_seconds"],
        "tokens_per_sec": result["tokens_per_sec"],
        "val_loss": loss,
        "val_bpb": bits_per_byte(loss, data),
        "curve": [],
    }


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    if not name or not overrides:
        raise SystemExit(f"--variant takes NAME:--key=value[,--key=value], got {text!r}")
    return name, overrides.split(",")


def run_track(track: str, args) -> list[list[object]]:
    data = prepare_track(track, args.out)
    recipe = TRACKS[track]
    rows = {
        **{name: spec for name, spec in BASELINES.items() if name not in args.skip},
        "recipe": (recipe, []),
        **{name: (recipe, overrides) for name, overrides in map(parse_variant, args.variant)},
    }
    results: dict[str, list[dict]] = {row: [] for row in rows}
    for repeat in range(args.repeats):
        for row, spec in rows.items():
            if spec is None:
                result = nanogpt_once(data, args)
            else:
                run_dir = args.out / f"run_{track}_{row.replace(' ', '_')}_{repeat}"
                result = train_once(row, spec[0], spec[1], data, run_dir, args)
            results[row].append(result)
            print(
                f"{track} | {row} | repeat {repeat + 1}: val {result['val_loss']:.4f}, "
                f"{result['iters']} iters, {result['tokens_per_sec']:,.0f} tok/s",
                flush=True,
            )
    write_curves(track, results, args.out)
    recipe_val = statistics.median(r["val_loss"] for r in results["recipe"])
    table = []
    for row, runs in results.items():
        val = statistics.median(r["val_loss"] for r in runs)
        table.append(
            [
                track,
                row,
                " ".join(rows[row][1]) if rows[row] else "benchmarks/nanogpt_baseline.py",
                ", ".join(f"{r['val_loss']:.4f}" for r in runs),
                f"{val:.4f}",
                f"{val - recipe_val:+.4f}",
                f"{statistics.median(r['val_bpb'] for r in runs):.3f}",
                f"{statistics.median(r['iters'] for r in runs):.0f}",
                f"{statistics.median(r.get('compile_seconds', 0.0) for r in runs):.0f}",
                f"{statistics.median(r['tokens_per_sec'] for r in runs):,.0f}",
            ]
        )
    return table


def write_curves(track: str, results: dict[str, list[dict]], out: Path) -> None:
    path = out / "curves.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["track", "row", "repeat", "iter", "tokens", "val_loss"])
        for row, runs in results.items():
            for repeat, r in enumerate(runs):
                writer.writerows([track, row, repeat, *point] for point in r["curve"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, runs in results.items():
        if runs[0]["curve"]:
            _, tokens, losses = zip(*runs[0]["curve"])
            ax.plot(tokens, losses, label=row)
    ax.set(xlabel="training tokens", ylabel="val loss (eval_iters batches)", title=f"{track}, first repeat")
    ax.legend()
    fig.savefig(out / f"curves_{track}.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--track", choices=[*TRACKS, "all"], default="all")
    parser.add_argument("--seconds", type=float, default=180.0, help="training wall-clock per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nanogpt-iters", type=int, default=2000, help="nanoGPT itself: its quick start's")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:--key=value,...")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=list(BASELINES),
        help="leave out a baseline row (a recipe search compares variants with the recipe)",
    )
    parser.add_argument("--out", type=Path, default=Path("speedrun"), help="data, runs and curves")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tracks = list(TRACKS) if args.track == "all" else [args.track]
    table = [row for track in tracks for row in run_track(track, args)]
    print(
        f"\n{args.seconds:.0f} s of training per run, {args.repeats} repeats, alternating, "
        f"{args.threads} threads, on {machine()}, {today()}"
    )
    header = [
        "track",
        "row",
        "overrides",
        "val loss (each run)",
        "median",
        "vs recipe",
        "bits/byte",
        "iters",
        "compile s (in the budget)",
        "train tokens/s",
    ]
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
