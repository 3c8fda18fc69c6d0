"""Generation speed of the decode engine by weight precision, against nanoGPT's algorithm.

    python benchmarks/generate.py [--run RUN] [--new-tokens 500] [--batch 8] [--repeats 3]

Every row decodes `--new-tokens` tokens after a 1-token prompt (temperature 0.8, top-k 200, the
cache sliding past block_size as in `smallgpt sample`) through decode.DecodeEngine. The baseline is
nanoGPT's generate(): fp32 weights, the whole context (up to block_size) recomputed for every new
token (`--no-kv-cache`), batch 1. Then the KV cache with fp32, bfloat16 and int8 weights
(runs.load_run's `--dtype` / `--quantize`), eager and compiled (`--compile`: the engine's decoding
step through torch.compile; compile time reported apart), at batch 1 and at `--batch` (tokens/s
summed over the rows). Rows run in turns, `--repeats` times each, and the table shows each row's median.

`--run` loads a trained run (default: a random GPT of nanoGPT's shakespeare size, 6 layers, 384
wide, block 256; speed does not depend on the weights) and adds its quality: val bits per byte of
each precision, the mean loss of every block_size window of the run's val split.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from common import machine, markdown_table, today

from smallgpt.data.prepare import load_meta
from smallgpt.decode import DecodeEngine, SamplingSettings
from smallgpt.device import cpu_has_bf16
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.model.quantize import for_inference
from smallgpt.runs import load_run
from smallgpt.train.run import resolve_dataset

PRECISIONS = {  # row label -> (dtype, quantize)
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "int8 weights, fp32 activations": ("float32", "int8"),
    "int8 weights, bf16 activations": ("bfloat16", "int8"),
}


def tokens_per_second(engine: DecodeEngine, new_tokens: int) -> float:
    """Decode max_batch requests of new_tokens together on an idle engine; tokens/s summed."""
    for seed in range(engine.max_batch):
        engine.add([0], SamplingSettings(max_new_tokens=new_tokens, temperature=0.8, top_k=200, seed=seed))
    start = time.perf_counter()
    count = 0
    while engine.busy:
        count += len(engine.step())
    return count / (time.perf_counter() - start)


@torch.no_grad()
def val_bits_per_byte(model: GPT, run: Path) -> float:
    """Mean loss over every whole block_size window of the run's val split, in bits per byte."""
    data = resolve_dataset(yaml.safe_load((run / "config.yaml").read_text())["data"]["dataset"])
    meta = load_meta(data)
    tokens = np.fromfile(data / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    block = model.config.block_size
    windows = torch.from_numpy(tokens[: (len(tokens) - 1) // block * block + 1])
    x = windows[:-1].view(-1, block)
    y = windows[1:].view(-1, block)
    total = 0.0
    for i in range(0, len(x), 16):
        _, loss = model(x[i : i + 16], y[i : i + 16])
        total += loss.float().item() * len(x[i : i + 16])
    counts = meta["counts"]
    bytes_per_token = counts["bytes"]["val"] / counts["tokens"]["val"]
    return total / len(x) / math.log(2) / bytes_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a trained run (default: random weights)")
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8, help="requests decoded together in the batched rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="add torch.compile rows"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.run is not None:
        base, _ = load_run(args.run, torch.device("cpu"))
    else:
        config = ModelConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)
        base = GPT(config).eval()
    # bf16 activations need a CPU that computes in bf16: elsewhere `--dtype bfloat16` is refused
    precisions = {k: p for k, p in PRECISIONS.items() if p[0] != "bfloat16" or cpu_has_bf16()}
    if len(precisions) < len(PRECISIONS):
        print("this CPU has no native bfloat16 (AVX512-BF16 or AMX): the bf16 rows are left out")
    models = {label: for_inference(copy.deepcopy(base), *p) for label, p in precisions.items()}
    # each row's engine lives for the whole benchmark, as in `smallgpt sample` or the server: a
    # compiled one compiles its decoding step once, in the warm-up
    rows = [("nanoGPT generate(): fp32, full recompute", DecodeEngine(base, max_batch=1, use_cache=False))]
    precision_of = {rows[0][0]: "fp32"}
    for batch in (1, args.batch):
        for compiled in (False, True) if args.compile else (False,):
            how = "KV cache, compiled" if compiled else "KV cache"
            size = f", batch {batch}" if batch > 1 else ""
            for precision, model in models.items():
                rows.append((f"{how}, {precision}{size}", DecodeEngine(model, batch, compile=compiled)))
                precision_of[rows[-1][0]] = precision

    speeds: dict[str, list[float]] = {label: [] for label, _ in rows}
    load, compile_seconds = [], []
    with torch.inference_mode():
        for _, engine in rows:  # warm-up: allocations, kernels, compiling
            start = time.perf_counter()
            tokens_per_second(engine, 2)
            if engine.decode_all is not None:
                compile_seconds.append(time.perf_counter() - start)
        for _ in range(args.repeats):
            load.append(os.getloadavg()[0])
            for label, engine in rows:
                speeds[label].append(tokens_per_second(engine, args.new_tokens))
    quality = {}
    if args.run is not None:
        quality = {label: val_bits_per_byte(m, args.run) for label, m in models.items()}

    baseline = statistics.median(speeds[rows[0][0]])
    table = []
    for label, _ in rows:
        speed = statistics.median(speeds[label])
        row = [label, f"{speed:,.0f}", f"{speed / baseline:.1f}x"]
        if quality:
            bpb = quality[precision_of[label]]
            row += [f"{bpb:.4f}", f"{100 * (bpb / quality['fp32'] - 1):+.2f}%"]
        table.append(row)
    header = ["decoding", "tokens/s (median)", "vs nanoGPT"]
    header += ["val bits/byte", "vs fp32"] if quality else []
    weights = f"run {args.run}" if args.run else "random weights"
    print(
        f"{args.new_tokens} new tokens, {base.num_params() / 1e6:.1f}M parameters ({weights}), "
        f"block_size {base.config.block_size}, {args.repeats} repeats, on {machine()}, "
        f"{torch.get_num_threads()} threads, {today()}; 1-minute load average at each round: "
        + ", ".join(f"{x:.2f}" for x in load)
    )
    if compile_seconds:
        seconds = f"{min(compile_seconds):.0f}-{max(compile_seconds):.0f}"
        print(f"compiling took {seconds} s per engine (not in the speeds)")
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
