"""Training throughput (tokens/s) against the number of processes, on CPU with gloo.

Trains the same small char model on tiny shakespeare with one process, then with 2 processes under
torchrun (DDP, then FSDP), for the same global batch (batch_size x block_size x accumulation tokens
per iteration). tokens/s is the median of the logged iterations after the first few. Run timed
benchmarks alone (flock) on a shared machine. Prints a Markdown table.

    flock /tmp/smallgpt-bench.lock python benchmarks/distributed_cpu.py --iters 40
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODEL = [
    "--block_size=64",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--batch_size=12",
    "--gradient_accumulation_steps=2",
]
RUNS = [(1, "ddp"), (2, "ddp"), (2, "fsdp")]  # (processes, parallel)
WARMUP_LOGS = 5  # logged iterations left out of the median


def prepare(out: Path) -> None:
    from smallgpt.preparation import PrepareArgs, run_prepare

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_prepare(PrepareArgs(input=str(SHARED / "tinyshakespeare" / "input.txt"), out=str(out)))


def tokens_per_sec(data: Path, run_dir: Path, nproc: int, parallel: str, iters: int) -> float:
    args = [f"--dataset={data}", f"--out_dir={run_dir}", f"--max_iters={iters}", f"--parallel={parallel}"]
    args += [*MODEL, "--eval_interval=100000", "--eval_iters=2", "--log_interval=1", "--progress=false"]
    command = [sys.executable, "-m", "smallgpt", "train", "--nproc", str(nproc), "--device=cpu", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in records if r["event"] == "train"][WARMUP_LOGS:]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args()
    tokens_per_iter = 12 * 64 * 2
    print(f"tiny char model (4 layers, 128 wide, block 64), {tokens_per_iter} tokens per iteration, gloo\n")
    print("| processes | parallel | tokens/s | speed-up |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(data)
        baseline = None
        for nproc, parallel in RUNS:
            speed = tokens_per_sec(data, Path(tmp) / f"run{nproc}{parallel}", nproc, parallel, args.iters)
            baseline = baseline or speed
            print(f"| {nproc} | {parallel} | {speed:,.0f} | {speed / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
