"""Decoding speed at batch 1: smallgpt's engine against llama.cpp on the same model, exported as GGUF.

    flock /tmp/smallgpt-bench.lock python benchmarks/generate_llamacpp.py [--new-tokens 500] [--repeats 5]

One random GPT of nanoGPT's shakespeare size (6 layers, 384 wide, block 256, 65 ids; speed does not
depend on the weights) decodes `--new-tokens` tokens after a 1-token prompt, temperature 0.8 and
top-k 200, in requests of at most block_size tokens (no context ever slides: llama.cpp cannot shift a
learned-position model's context) in:
  llama.cpp (the `xllamacpp` wheel's llama-server, its own timings: prompt + decoding), the file
      written by `smallgpt export --format gguf` in f32, f16 and q8_0;
  smallgpt's DecodeEngine with the KV cache, fp32, bf16 (where the CPU has it) and int8 weights,
      eager and compiled (compile time left out).
Both use torch's thread count (`--threads` sets it). Each row runs in a fresh process of its own
(llama.cpp's idle server threads in the same process took two thirds of smallgpt's speed, and several
servers slowed each other), rows in turns, `--repeats` times; the table shows medians and the ratio
of each row to llama.cpp's fastest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, markdown_table, today
from generate import PRECISIONS

from smallgpt.data.tokenizers import CharTokenizer
from smallgpt.decode import DecodeEngine, SamplingSettings
from smallgpt.device import cpu_has_bf16
from smallgpt.model.gguf import DTYPES, write_gguf
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.model.quantize import for_inference
from smallgpt.train.checkpoint import model_weights

SAMPLING = {"temperature": 0.8, "top_k": 200}


def requests(new_tokens: int, block_size: int) -> list[int]:
    """New tokens per request: each fits the context with its 1-token prompt."""
    most = block_size - 1
    return [most] * (new_tokens // most) + ([new_tokens % most] if new_tokens % most else [])


class LlamaCpp:
    """llama.cpp's server on one GGUF file (127.0.0.1), one slot."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.verbosity = -1
        self.server = xllamacpp.Server(params)

    def decode_seconds(self, new_tokens: int) -> float:
        body = {"prompt": [0], "n_predict": new_tokens, "ignore_eos": True, "cache_prompt": False, "seed": 0}
        body |= {**SAMPLING, "top_p": 1.0, "min_p": 0.0}
        timings = self.server.handle_completions(body)["timings"]
        assert timings["predicted_n"] == new_tokens
        return (timings["prompt_ms"] + timings["predicted_ms"]) / 1000


def smallgpt_seconds(engine: DecodeEngine, new_tokens: int) -> float:
    engine.add([0], SamplingSettings(max_new_tokens=new_tokens, **SAMPLING, seed=0))
    start = time.perf_counter()
    while engine.busy:
        engine.step()
    return time.perf_counter() - start


def build_row(label: str, threads: int) -> object:
    """The one engine a row times, over the benchmark's model (seeded: every process builds the same)."""
    torch.manual_seed(0)
    chars = "".join(chr(c) for c in range(32, 95))  # 63 characters: 65 ids with <|endoftext|>, <|unk|>
    tokenizer = CharTokenizer(chars)
    config = ModelConfig(block_size=256, vocab_size=tokenizer.vocab_size, n_layer=6, n_head=6, n_embd=384)
    base = GPT(config).eval()
    kind, _, precision = label.partition(" ")
    if kind == "llama.cpp":
        path = Path(tempfile.mkdtemp(prefix="gguf-bench-")) / f"model-{precision}.gguf"
        write_gguf(path, model_weights(base), config, tokenizer, precision, "bench")
        return LlamaCpp(path, config.block_size, threads)
    name, _, how = precision.rpartition(", ")
    return DecodeEngine(for_inference(base, *PRECISIONS[name]), max_batch=1, compile=how == "compiled")


def row_labels() -> list[str]:
    labels = [f"llama.cpp {dtype}" for dtype in DTYPES]
    precisions = [k for k, p in PRECISIONS.items() if p[0] != "bfloat16" or cpu_has_bf16()]
    return labels + [f"smallgpt {label}, {how}" for how in ("eager", "compiled") for label in precisions]


def worker(label: str, new_tokens: int, threads: int) -> None:
    """One row alone in this process: warm up (allocations, kernels, compiling), then print tokens/s."""
    torch.set_num_threads(threads)
    runner = build_row(label, threads)
    chunks = requests(new_tokens, 256)

    def seconds(n: int) -> float:
        if isinstance(runner, LlamaCpp):
            return runner.decode_seconds(n)
        assert isinstance(runner, DecodeEngine)
        return smallgpt_seconds(runner, n)

    with torch.inference_mode():
        seconds(4)
        print(json.dumps({"tokens_per_sec": new_tokens / sum(seconds(n) for n in chunks)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="for both engines (default: torch's)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    if args.worker:
        return worker(args.worker, args.new_tokens, threads)
    speeds: dict[str, list[float]] = {label: [] for label in row_labels()}
    for _ in range(args.repeats):
        for label in speeds:
            command = [sys.executable, __file__, "--worker", label, "--new-tokens", str(args.new_tokens)]
            done = subprocess.run([*command, "--threads", str(threads)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
            speeds[label].append(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_sec"])
    medians = {label: statistics.median(s) for label, s in speeds.items()}
    fastest_llama = max(v for k, v in medians.items() if k.startswith("llama.cpp"))
    table = [[label, f"{speed:,.0f}", f"{speed / fastest_llama:.2f}x"] for label, speed in medians.items()]
    print(
        f"{args.new_tokens} new tokens at batch 1 in requests of {requests(args.new_tokens, 256)}, 10.7M "
        f"parameters (random), block_size 256, {args.repeats} repeats, each row in a fresh process, "
        f"{threads} threads, on {machine()}, {today()}"
    )
    print(markdown_table(["decoding", "tokens/s (median)", "vs llama.cpp's fastest"], table))


if __name__ == "__main__":
    main()
