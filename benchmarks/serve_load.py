"""Load test of `smallgpt serve`: 1, 4 and 8 concurrent streaming clients on 127.0.0.1.

    python benchmarks/serve_load.py [--clients 1 4 8] [--seconds 20] [--max-tokens 200] [--threads N]
                                    [--dtype bfloat16] [--quantize int8] [--compile]

Serves a randomly initialised GPT of nanoGPT's shakespeare size (6 layers, 384 wide, block 256,
char vocabulary; speed does not depend on the weights) with `smallgpt serve --max-batch 8` in a
child process, then lets each client stream greedy completions one after another for --seconds
(at most --max-requests each). Reports aggregate tokens/s, time to first token and time between
tokens (p50/p95, as the clients see them), next to benchmarks/generate.py's figures: the engine's
KV-cache decoding of one request and of 8 together, in this process with the same threads and no
HTTP (what the server can reach at most), and the CPU the server used (in cores, its engine's process
included).
`--dtype`, `--quantize` and `--compile` go to the server and to those engines alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import SHARED_DATA, machine, markdown_table, today
from generate import tokens_per_second

from smallgpt.data.tokenizers import CharTokenizer, save_tokenizer
from smallgpt.decode import DecodeEngine
from smallgpt.model.gpt import GPT, ModelConfig
from smallgpt.model.quantize import for_inference
from smallgpt.train import checkpoint

HOST = "127.0.0.1"  # the only address this benchmark talks to


def write_random_run(run: Path, n_layer: int, n_embd: int, block_size: int) -> GPT:
    """A run folder holding a random GPT and tiny shakespeare's char tokenizer."""
    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_texts([text])
    config = ModelConfig(
        block_size=block_size, vocab_size=tokenizer.vocab_size, n_layer=n_layer, n_head=6, n_embd=n_embd
    )
    torch.manual_seed(0)
    model = GPT(config).eval()
    tags = {"tokenizer_fingerprint": tokenizer.fingerprint()}
    checkpoint.write_checkpoint(run / "ckpt" / "best", checkpoint.model_weights(model), config, {}, tags)
    save_tokenizer(tokenizer, run / "tokenizer.json")
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "smallgpt", "serve", "--run", str(run), "--port", str(port)]
    command += ["--host", HOST, "--device", "cpu", "--max-batch", "8"]
    command += ["--dtype", args.dtype, "--quantize", args.quantize] + (["--compile"] if args.compile else [])
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"smallgpt serve exited:\n{log.read_text()}")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=2)
            connection.request("GET", "/health")
            connection.getresponse().read()
            return server
        except OSError:
            time.sleep(0.3)
    server.terminate()
    raise SystemExit("smallgpt serve did not start in 120 s")


class Client:
    """Streams completions one after another; records when each token arrived."""

    def __init__(self, port: int, model: str, max_tokens: int, prompt: str):
        self.port = port
        self.body = json.dumps(
            {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        )
        self.tokens = 0
        self.first_token: list[float] = []  # seconds from request to first token
        self.between: list[float] = []  # seconds between a request's successive tokens

    def stream_one(self) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=120)
        start = time.perf_counter()
        connection.request("POST", "/v1/completions", self.body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"the server answered {response.status}: {response.read()!r}")
        last = None
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            if json.loads(line[6:])["choices"][0]["text"]:
                now = time.perf_counter()
                if last is None:
                    self.first_token.append(now - start)
                else:
                    self.between.append(now - last)
                last = now
                self.tokens += 1
        connection.close()

    def run(self, until: float, max_requests: int) -> None:
        for _ in range(max_requests):
            if time.perf_counter() >= until:
                break
            self.stream_one()


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its children (the engines' processes) have used so far
    (Linux's /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [
            int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()
        ]
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(map(cpu_seconds, children))


def load(server: subprocess.Popen, port: int, model: str, clients: int, args: argparse.Namespace) -> dict:
    runners = [Client(port, model, args.max_tokens, prompt=f"ROMEO {chr(65 + i)}:") for i in range(clients)]
    server_cpu = cpu_seconds(server.pid)
    start = time.perf_counter()
    threads = [
        threading.Thread(target=c.run, args=(start + args.seconds, args.max_requests)) for c in runners
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(not c.first_token for c in runners):
        raise SystemExit("a client got no token: see the error above")
    elapsed = time.perf_counter() - start
    server_cores = (cpu_seconds(server.pid) - server_cpu) / elapsed
    first = [t for c in runners for t in c.first_token]
    between = [t for c in runners for t in c.between]
    return {
        "tokens_per_s": sum(c.tokens for c in runners) / elapsed,
        "requests": len(first),
        "ttft": (percentile(first, 50), percentile(first, 95)),
        "tbt": (percentile(between, 50), percentile(between, 95)),
        "server_cores": server_cores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=20, help="each level runs this long (then finishes)")
    parser.add_argument("--max-requests", type=int, default=40, help="per client and level")
    parser.add_argument("--max-tokens", type=int, default=200)
    # default: torch's own (one per core), as `smallgpt serve` runs. On a 2-core machine busy with
    # other jobs, 1 is steadier: a second intra-op thread spin-waits (generate.py's batch-1 figure
    # once fell from 55 to 3 tokens/s at load 8); on an otherwise idle one, 2 decode 8 rows faster
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of the server (and the baseline)",
    )
    parser.add_argument("--dtype", default="float32", help="the weights' dtype (as `smallgpt serve --dtype`)")
    parser.add_argument("--quantize", default="none", help="int8 weights (as `smallgpt serve --quantize`)")
    parser.add_argument("--compile", action="store_true", help="compiled decoding step (as `smallgpt serve`)")
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--block_size", type=int, default=256)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "shakespeare-6x384"
        model = write_random_run(run, args.n_layer, args.n_embd, args.block_size)
        parameters = model.num_params()
        torch.set_num_threads(args.threads)
        model = for_inference(model, args.dtype, args.quantize)
        with torch.inference_mode():
            one = DecodeEngine(model, max_batch=1, compile=args.compile)
            eight = DecodeEngine(model, max_batch=8, compile=args.compile)
            tokens_per_second(one, 20)  # warm-up (and compiling)
            tokens_per_second(eight, 2)
            alone = tokens_per_second(one, args.max_tokens)  # generate.py's KV-cache row
            batch8 = tokens_per_second(eight, args.max_tokens)  # the engine's ceiling
        port = free_port()
        server = start_server(run, port, args, Path(tmp) / "serve.log")
        try:
            Client(port, run.name, 20, "warm-up").stream_one()
            results = {n: load(server, port, run.name, n, args) for n in args.clients}
        finally:
            server.terminate()
            server.wait(timeout=30)

    base = results[args.clients[0]]["tokens_per_s"]
    rows = [
        ["engine alone, batch 1, no HTTP (generate.py's KV cache)", "-", f"{alone:,.0f}", "", "", "", ""],
        ["engine alone, batch 8, no HTTP", "-", f"{batch8:,.0f} ({batch8 / alone:.1f}x)", "", "", "", ""],
    ]
    for n, r in results.items():
        rows.append(
            [
                f"{n} streaming client{'s' if n > 1 else ''}",
                r["requests"],
                f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s'] / base:.1f}x)",
                f"{r['ttft'][0] * 1000:.0f} / {r['ttft'][1] * 1000:.0f}",
                f"{r['tbt'][0] * 1000:.1f} / {r['tbt'][1] * 1000:.1f}",
                f"{r['tokens_per_s'] / n:,.0f}",
                f"{r['server_cores']:.2f}",
            ]
        )
    print(
        f"{parameters / 1e6:.1f}M parameters (random weights), block_size {args.block_size}, "
        f"greedy, max_tokens {args.max_tokens}, {args.seconds:.0f} s per level, server torch threads "
        f"{args.threads}, --dtype {args.dtype} --quantize {args.quantize}{' --compile' * args.compile}, "
        f"on {machine()}, {today()}"
    )
    header = [
        "load",
        "requests",
        "tokens/s (vs 1 client)",
        "TTFT p50 / p95 ms",
        "between tokens p50 / p95 ms",
    ]
    print(markdown_table([*header, "tokens/s per client", "server CPU (cores)"], rows))


if __name__ == "__main__":
    main()
