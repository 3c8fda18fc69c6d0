"""Throughput and peak memory of `smallgpt prepare --tokenizer gpt2` on large inputs.

Each input is built by repeating the shared corpora (TinyStories stories, tiny shakespeare,
西游记) in a temp folder: as `<|endoftext|>`-separated documents in a .txt file, or (--format
jsonl.gz) as one {"text": ...} line per document in a gzip-compressed JSON-lines file. `--mb` is the
size of the file on disk, compressed or not. Each input is prepared in a fresh subprocess so that its
peak RSS (ru_maxrss) is its own. Peak RSS that stays flat as the input grows shows that memory is
bounded. Prints a Markdown table; MB/s counts the text (UTF-8) read, not the compressed bytes.

    python benchmarks/prepare.py --mb 50 150
    python benchmarks/prepare.py --format jsonl.gz --mb 100
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
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


FORMATS = ("txt", "jsonl.gz")


def build_input(path: Path, megabytes: float, data: Path, fmt: str) -> int:
    """Write at least `megabytes` MB of repeated corpora to `path`; returns its size in bytes."""
    docs = [(data / name).read_text(encoding="utf-8-sig") for name in CORPORA]
    docs = [doc.strip() for text in docs for doc in text.split("<|endoftext|>") if doc.strip()]
    if fmt == "txt":
        unit = "".join(doc + "\n<|endoftext|>\n" for doc in docs).encode("utf-8")
    else:
        unit = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs).encode("utf-8")
    with open(path, "wb") as raw:
        out = gzip.GzipFile(fileobj=raw, mode="wb") if fmt == "jsonl.gz" else raw
        while raw.tell() < megabytes * 1e6:  # the size on disk: compressed bytes for jsonl.gz
            out.write(unit)
        out.close()
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
                "text_mb": sum(counts["bytes"].values()) / 1e6,
            }
        )
    )


def measure(megabytes: float, data: Path, tmp: Path, fmt: str) -> dict:
    path = tmp / f"corpus_{megabytes:g}mb.{fmt}"
    size = build_input(path, megabytes, data, fmt)
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
    parser.add_argument("--format", choices=FORMATS, default="txt", help="the input file's format")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder of shared corpora")
    parser.add_argument("--worker", nargs=2, metavar=("INPUT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    print(f"gpt2 prepare, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("| input | input MB | text MB | documents | tokens | seconds | text MB/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            r = measure(mb, args.data, Path(tmp), args.format)
            print(
                f"| .{args.format} | {r['mb']:.0f} | {r['text_mb']:.0f} | {r['documents']:,} "
                f"| {r['tokens']:,} | {r['seconds']:.1f} | {r['text_mb'] / r['seconds']:.1f} "
                f"| {r['peak_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
