"""Training speed and quality on CPU: nanoGPT's CPU quick start on tiny shakespeare (char).

    python benchmarks/train_cpu.py [--config configs/nanogpt_cpu_quickstart.yaml] [--key=value ...]

Prints tokens/s, wall time and final val loss as a Markdown table. nanoGPT runs this configuration
at about 13k tokens/s on our 2-core machine and ends near val loss 1.88 (its README: ~3 minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, machine, markdown_table, prepare_once, today

from smallgpt.config import load_config
from smallgpt.train import checkpoint
from smallgpt.train.run import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/nanogpt_cpu_quickstart.yaml")
    parser.add_argument("--input", default=str(SHARED_DATA / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--data", default=None, help="prepared data folder (default: a temp folder)")
    args, overrides = parser.parse_known_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_once(Path(args.input), Path(args.data or Path(tmp) / "data"))
        run_dir = Path(tmp) / "run"
        config = load_config(
            args.config, [f"--dataset={data}", f"--out_dir={run_dir}", "--progress=false", *overrides]
        )
        start = time.perf_counter()
        metrics = train(config)
        wall = time.perf_counter() - start
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_seconds = checkpoint.load_state(run_dir / "ckpt" / "last")["train_seconds"]

    steps = [e for e in events if e["event"] == "train"][1:]  # the first step includes warm-up work
    tokens_per_sec = statistics.median(e["tokens_per_sec"] for e in steps)
    print()
    print(f"{args.config} {' '.join(overrides)} on {machine()}, {today()}")
    print(
        markdown_table(
            [
                "iters",
                "tokens",
                "tokens/s (median)",
                "train s (no eval)",
                "wall s",
                "val loss",
                "val bits/byte",
            ],
            [
                [
                    config.train.max_iters,
                    f"{events[-1]['tokens']:,}",
                    f"{tokens_per_sec:,.0f}",
                    f"{train_seconds:.0f}",
                    f"{wall:.0f}",
                    f"{metrics['val_loss']:.4f}",
                    f"{metrics.get('val_bpb', float('nan')):.3f}",
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
