"""Quality per CPU-minute: validation loss of nanoGPT's CPU quick-start config and of smallgpt's
tuned config on tiny shakespeare (char), each given the same training wall-clock on this machine.

The nanoGPT config runs its 2000 iterations first; its training seconds (evaluation excluded)
become the tuned config's `max_seconds`, so the tuned run stops at the same wall-clock even if it
has iterations left. Run it alone (timings) and print a Markdown table:

    flock /tmp/smallgpt-bench.lock .venv/bin/python benchmarks/quality_cpu.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

from smallgpt.config import load_config
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.train import checkpoint
from smallgpt.train.run import train

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BASELINE = REPO / "configs" / "nanogpt_cpu_quickstart.yaml"
TUNED = REPO / "configs" / "shakespeare_char_cpu.yaml"


def run(config_path: Path, data: Path, out: Path, seconds: float = 0.0) -> dict:
    """Train one config quietly; its final metrics, iterations and training seconds."""
    overrides = [f"--dataset={data}", f"--out_dir={out}", "--progress=false"]
    if seconds:
        overrides.append(f"--max_seconds={seconds}")
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train(load_config(config_path, overrides))
    state = checkpoint.load_state(out / "ckpt" / "last")
    return {**metrics, "iters": state["iter_num"], "seconds": state["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=SHAKESPEARE, help="tiny shakespeare input.txt")
    parser.add_argument("--tuned", type=Path, nargs="+", default=[TUNED], help="configs to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tinyshakespeare_char"
        with contextlib.redirect_stdout(io.StringIO()):
            run_prepare(PrepareArgs(input=str(args.input), out=str(data)))
        rows = {BASELINE: run(BASELINE, data, Path(tmp) / "baseline")}
        budget = rows[BASELINE]["seconds"]
        for n, config in enumerate(args.tuned):
            rows[config] = run(config, data, Path(tmp) / f"tuned{n}", seconds=budget)
    print(f"tiny shakespeare (char), {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| config | iters | train seconds | val loss | val bits/byte |")
    print("|---|---:|---:|---:|---:|")
    for config, r in rows.items():
        name = config.relative_to(REPO) if config.is_relative_to(REPO) else config
        print(f"| {name} | {r['iters']} | {r['seconds']:.0f} | {r['val_loss']:.4f} | {r['val_bpb']:.3f} |")


if __name__ == "__main__":
    main()
