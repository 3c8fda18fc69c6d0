"""Throughput and peak memory of `smallgpt prepare --tokenizer gpt2` on large inputs.

Each input is built by repeating the shared corpora (TinyStories stories, tiny shakespeare,
西游记) as `<|endoftext|>`-separated documents in a temp folder, and prepared in a fresh
subprocess so that its peak RSS (ru_maxrss) is its own. Peak RSS that stays flat as the input
grows shows that memory is bounded. Prints a Markdown table.

    python benchmarks/prepare.py --mb 50 150
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CORPORA = (
    "tinystories/tinystories_valid_prefix_eot.txt",
    "tinyshakespeare/input.txt",
    "chinese_novel/xiyouji.txt",
)


def build_input(path: Path, megabytes: float, data: Path) -> int:
    """Write at least `megabytes` MB of repeated corpora to `path`; returns its size in bytes."""
    unit = "".join(
        (data / name).read_text(encoding="utf-8-sig") + "\n<|endoftext|>\n" for name in CORPORA
    ).encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(-(-int(megabytes * 1e6) // len(unit))):
            f.write(unit)
    return path.stat().st_size


def worker(input_path: str, out: str) -> None:
    """Prepare one input and print its timing and peak memory as JSON."""
    from smallgpt.preparation import PrepareArgs, run_prepare

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        meta = run_prepare(PrepareArgs(input=input_path, tokenizer="gpt2", out=out))
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    counts = meta["counts"]
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mb": peak_kb / 1024,
                "documents": sum(counts["documents"].values()),
                "tokens": sum(counts["tokens"].values()),
            }
        )
    )


def measure(megabytes: float, data: Path, tmp: Path) -> dict:
    path = tmp / f"corpus_{megabytes:g}mb.txt"
    size = build_input(path, megabytes, data)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, __file__, "--worker", str(path), str(tmp / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"prepare failed on {path}:\n{done.stderr}")
    result = json.loads(done.stdout.splitlines()[-1])
    path.unlink()
    return {"mb": size / 1e6, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mb", type=float, nargs="+", default=[50, 150], help="input sizes in MB (one table row each)"
    )
    parser.add_argument("--data", type=Path, default=SHARED, help="folder of shared corpora")
    parser.add_argument("--worker", nargs=2, metavar=("INPUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    print(f"gpt2 prepare, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| input MB | documents | tokens | seconds | MB/s | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            r = measure(mb, args.data, Path(tmp))
            print(
                f"| {r['mb']:.0f} | {r['documents']:,} | {r['tokens']:,} | {r['seconds']:.1f} "
                f"| {r['mb'] / r['seconds']:.1f} | {r['peak_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
