"""Training speed and quality on CPU: nanoGPT's CPU quick start on tiny shakespeare (char).

    python benchmarks/train_cpu.py [--config configs/nanogpt_cpu_quickstart.yaml] [--key=value ...]
    python benchmarks/train_cpu.py --compare 3     # side by side with nanoGPT, alternating

The first form trains smallgpt once and prints tokens/s, wall time and final val loss. `--compare
N` runs benchmarks/nanogpt_baseline.py (nanoGPT's training step for this config, restated) and
smallgpt (once per `--dtypes`: float32, and bfloat16, which on a CPU means bf16 autocast) N times
each, alternating, each in a fresh process, and prints every run and the medians:
end-to-end seconds (the whole training call, evaluations and checkpoints included), training
tokens/s (optimizer steps only) and the final val loss, with smallgpt's ratio to nanoGPT.

`--size` sets both sides' shape (the quick start's config otherwise, with its lr and schedule):
- `quick`: nanoGPT's CPU quick start, 4 x 128, block 64, batch 12, 2000 iterations;
- `6x384`: nanoGPT's tiny-shakespeare GPU model, 6 x 384, block 256, batch 12, 40 iterations;
- `124m`: GPT-2 124M, 12 x 768, block 1024, batch 4, on GPT-2 BPE tokens, 6 iterations.
The larger two measure speed only (their val loss after a few steps means nothing) and evaluate
only once, on one batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, machine, markdown_table, prepare_once, today

from smallgpt.config import load_config
from smallgpt.train import checkpoint
from smallgpt.train.run import train

BENCHMARKS = Path(__file__).resolve().parent
SPEED_ONLY = ["--eval_interval=100000", "--eval_iters=1"]
SIZES: dict[str, dict] = {
    "quick": {"shape": [], "max_iters": 2000, "tokenizer": "char"},
    "6x384": {
        "shape": ["--n_layer=6", "--n_head=6", "--n_embd=384", "--block_size=256", "--batch_size=12"],
        "max_iters": 40,
        "tokenizer": "char",
    },
    "124m": {
        "shape": ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024", "--batch_size=4"],
        "max_iters": 6,
        "tokenizer": "gpt2",
    },
}


def run_smallgpt(config_path: str, data: Path, overrides: list[str]) -> dict:
    """Train once; the figures nanogpt_baseline.py reports, plus the median logged tokens/s."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        config = load_config(
            config_path, [f"--dataset={data}", f"--out_dir={run_dir}", "--progress=false", *overrides]
        )
        start = time.perf_counter()
        metrics = train(config)
        seconds = time.perf_counter() - start
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        state = checkpoint.load_state(run_dir / "ckpt" / "last")
    steps = [e for e in events if e["event"] == "train"][1:] or [{"tokens_per_sec": float("nan")}]
    return {
        "iterations": state["iter_num"],
        "tokens": state["tokens_seen"],
        "seconds": seconds,
        "train_seconds": state["train_seconds"],
        "tokens_per_sec": state["tokens_seen"] / state["train_seconds"],
        "logged_tokens_per_sec": statistics.median(e["tokens_per_sec"] for e in steps),
        "val_loss": metrics["val_loss"],
        "val_bpb": metrics.get("val_bpb", float("nan")),
    }


def in_subprocess(which: str, args: argparse.Namespace, data: Path, overrides: list[str]) -> dict:
    """nanoGPT's run, or smallgpt's with `which` = its dtype."""
    shape = shape_flags(args.size)
    if which == "nanogpt":
        cmd = [sys.executable, str(BENCHMARKS / "nanogpt_baseline.py"), "--data", str(data)]
        cmd += ["--max_iters", str(args.max_iters), *shape]
    else:
        dtype, _, compile_ = which.partition("+")  # bfloat16+compile: torch.compile too
        cmd = [sys.executable, __file__, "--worker", "--config", args.config, "--data", str(data)]
        cmd += [f"--max_iters={args.max_iters}", f"--dtype={dtype}", *shape, *overrides]
        cmd += ["--compile=true"] if compile_ else []
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        sys.exit(f"{which} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def shape_flags(size: str) -> list[str]:
    """The `--key=value` flags both nanoGPT (restated) and smallgpt take for a --size."""
    return SIZES[size]["shape"] + (SPEED_ONLY if size != "quick" else [])


def compare(args: argparse.Namespace, data: Path, overrides: list[str]) -> None:
    runs: dict[str, list[dict]] = {"nanogpt": [], **{dtype: [] for dtype in args.dtypes}}
    load = []
    for repeat in range(args.compare):
        for which in runs:
            load.append(os.getloadavg()[0])
            runs[which].append(in_subprocess(which, args, data, overrides))
            r = runs[which][-1]
            print(
                f"{which} run {repeat + 1}: {r['seconds']:.1f} s, {r['tokens_per_sec']:,.0f} tok/s",
                flush=True,
            )

    def median(which: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[which])

    rows = []
    for which in runs:
        label = "nanoGPT (restated)" if which == "nanogpt" else f"smallgpt, dtype={which}"
        seconds = ", ".join(f"{r['seconds']:.1f}" for r in runs[which])
        speed = median(which, "tokens_per_sec") / median("nanogpt", "tokens_per_sec")
        end_to_end = median("nanogpt", "seconds") / median(which, "seconds")
        rows.append(
            [
                label,
                seconds,
                f"{median(which, 'seconds'):.1f}",
                f"{end_to_end:.2f}x",
                f"{median(which, 'tokens_per_sec'):,.0f}",
                f"{speed:.2f}x",
                f"{median(which, 'val_loss'):.4f}",
            ]
        )
    print()
    print(
        f"{args.config} --size {args.size} max_iters={args.max_iters} {' '.join(overrides)}, "
        f"{args.compare} runs each, "
        f"alternating, on {machine()}, {today()}; 1-minute load average at each start: "
        + ", ".join(f"{x:.2f}" for x in load)
    )
    print(
        markdown_table(
            [
                "",
                "end-to-end s (each run)",
                "median s",
                "speed-up",
                "train tokens/s (median)",
                "speed-up",
                "val loss",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", default="configs/nanogpt_cpu_quickstart.yaml")
    parser.add_argument("--input", default=str(SHARED_DATA / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--data", default=None, help="prepared data folder (default: a temp folder)")
    parser.add_argument("--compare", type=int, default=0, metavar="N", help="N runs each beside nanoGPT")
    parser.add_argument("--size", choices=SIZES, default="quick", help="both sides' model shape")
    parser.add_argument(
        "--max_iters", type=int, default=None, help="iterations (both, with --compare; default: the size's)"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        help="smallgpt's runs in --compare (DTYPE+compile also compiles; compiling is not counted)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()

    size = SIZES[args.size]
    args.max_iters = args.max_iters or size["max_iters"]
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_once(Path(args.input), Path(args.data or Path(tmp) / "data"), size["tokenizer"])
        if args.compare:
            compare(args, data, overrides)
            return
        flags = [f"--max_iters={args.max_iters}", *shape_flags(args.size)]  # a worker's size is quick
        r = run_smallgpt(args.config, data, [*flags, *overrides])
        if args.worker:
            print(json.dumps(r))
            return
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
                    r["iterations"],
                    f"{r['tokens']:,}",
                    f"{r['logged_tokens_per_sec']:,.0f}",
                    f"{r['train_seconds']:.0f}",
                    f"{r['seconds']:.0f}",
                    f"{r['val_loss']:.4f}",
                    f"{r['val_bpb']:.3f}",
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
