"""Throughput and peak memory of `smallgpt prepare` on large inputs, by tokenizer and thread count.

Each input is built by repeating the shared corpora (TinyStories stories, tiny shakespeare,
西游记) in a temp folder: as `<|endoftext|>`-separated documents in a .txt file, or (--format
jsonl.gz) as one {"text": ...} line per document in a gzip-compressed JSON-lines file. `--mb` is the
size of the file on disk, compressed or not. Each run is a fresh subprocess, so that its peak RSS
(ru_maxrss) is its own. Peak RSS that stays flat as the input grows shows that memory is bounded.
MB/s counts the text (UTF-8) read, not the compressed bytes.

For every input size and tokenizer (`--tokenizer gpt2 char bpe:4096`), smallgpt runs with each of
`--threads` (1: the single-process baseline, encoding on the reading thread's heels), alternating,
`--repeats` times each; the table shows medians and the speed-up over 1 thread. `--nanogpt` adds,
for gpt2 and .txt input, nanoGPT-style preparation: the whole file read into memory, split at the
markers, `encode_ordinary` per document in one process, one array written (its memory grows with
the input).

    python benchmarks/prepare.py --mb 100 1000 --tokenizer gpt2 char bpe:4096 --threads 1 2 --nanogpt
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
import statistics
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


def worker(input_path: str, out: str, tokenizer: str, threads: int) -> None:
    """Prepare one input and print its timing and peak memory as JSON (threads 0: nanoGPT-style)."""
    start = time.perf_counter()
    if threads == 0:
        counts = nanogpt_style(Path(input_path), Path(out))
    else:
        from smallgpt.data import prepare
        from smallgpt.preparation import PrepareArgs, run_prepare

        prepare.THREADS = threads
        with contextlib.redirect_stdout(io.StringIO()):
            # every repeat prepares into the same scratch folder, replacing the last one's data
            args = PrepareArgs(input=input_path, tokenizer=tokenizer, out=out, overwrite=True)
            counts = run_prepare(args)["counts"]
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
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


def nanogpt_style(path: Path, out: Path) -> dict:
    """nanoGPT's way, restated (its data/*/prepare.py): read everything, encode_ordinary each
    document and append end-of-text, 90/10 split, uint16 arrays written with tofile."""
    import numpy as np

    from smallgpt.data.tokenizers import EOT, GPT2Tokenizer

    enc = GPT2Tokenizer()._enc
    text = path.read_text(encoding="utf-8")
    docs = [doc.strip() for doc in text.split(EOT) if doc.strip()]
    ids: list[int] = []
    for doc in docs:
        ids.extend(enc.encode_ordinary(doc))
        ids.append(enc.eot_token)
    data = np.array(ids, dtype=np.uint16)
    cut = int(len(data) * 0.9)
    out.mkdir(parents=True, exist_ok=True)
    data[:cut].tofile(out / "train.bin")
    data[cut:].tofile(out / "val.bin")
    n_bytes = len(text.encode("utf-8"))
    return {"documents": {"all": len(docs)}, "tokens": {"all": len(data)}, "bytes": {"all": n_bytes}}


def measure(path: Path, tmp: Path, tokenizer: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, __file__, "--worker", str(path), str(tmp / "out"), tokenizer, str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"prepare failed on {path}:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mb", type=float, nargs="+", default=[50, 150], help="input sizes in MB (one group of rows each)"
    )
    parser.add_argument("--format", choices=FORMATS, default="txt", help="the input file's format")
    parser.add_argument("--tokenizer", nargs="+", default=["gpt2"], help="tokenizers to compare")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row, alternating; medians")
    parser.add_argument("--nanogpt", action="store_true", help="add the nanoGPT-style row (gpt2, .txt)")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder of shared corpora")
    parser.add_argument(
        "--worker", nargs=4, metavar=("INPUT", "OUT", "TOK", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        input_path, out, tokenizer, threads = args.worker
        worker(input_path, out, tokenizer, int(threads))
        return
    print(
        f"smallgpt prepare, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        + time.strftime("%Y-%m-%d")
    )
    print()
    print(
        "| input | input MB | text MB | tokenizer | how | documents | tokens | seconds | text MB/s "
        "| vs 1 thread | peak RSS MB | load |"
    )
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            path = Path(tmp) / f"corpus_{mb:g}mb.{args.format}"
            size = build_input(path, mb, args.data, args.format)
            rows = [(tok, n) for tok in args.tokenizer for n in args.threads]
            if args.nanogpt and args.format == "txt":
                rows.append(("gpt2", 0))
            runs: dict[tuple[str, int], list[dict]] = {row: [] for row in rows}
            for _ in range(args.repeats):
                for row in rows:
                    load = os.getloadavg()[0]
                    runs[row].append({**measure(path, Path(tmp), *row), "load": load})
            for tok, threads in rows:
                r = {k: statistics.median(x[k] for x in runs[tok, threads]) for k in runs[tok, threads][0]}
                one = runs.get((tok, 1))
                base = statistics.median(x["text_mb"] / x["seconds"] for x in one) if one else float("nan")
                speed = r["text_mb"] / r["seconds"]
                how = "nanoGPT-style, 1 process" if threads == 0 else f"smallgpt, {threads} thread(s)"
                print(
                    f"| .{args.format} | {size / 1e6:.0f} | {r['text_mb']:.0f} | {tok} | {how} "
                    f"| {r['documents']:,.0f} | {r['tokens']:,.0f} | {r['seconds']:.1f} | {speed:.1f} "
                    f"| {speed / base:.2f}x | {r['peak_mb']:.0f} | {r['load']:.1f} |",
                    flush=True,
                )
            path.unlink()


if __name__ == "__main__":
    main()
