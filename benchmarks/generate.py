"""Generation speed of the decode engine: KV cache alone and batched, and full recompute.

    python benchmarks/generate.py [--new-tokens 500] [--batch 8] [--n_layer 6 --n_embd 384 --block_size 256]

A randomly initialised GPT of nanoGPT's shakespeare size (speed does not depend on the weights)
continues 1-token prompts; tokens/s of one request with and without the cache, and of `--batch`
requests decoded together (summed over the batch). Past block_size the cache slides, as in `sample`.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, markdown_table, today

from smallgpt.decode import DecodeEngine, SamplingSettings
from smallgpt.model.gpt import GPT, ModelConfig


def tokens_per_second(model: GPT, new_tokens: int, use_cache: bool, batch: int = 1) -> float:
    engine = DecodeEngine(model, max_batch=batch, use_cache=use_cache)
    for seed in range(batch):
        engine.add([0], SamplingSettings(max_new_tokens=new_tokens, temperature=0.8, top_k=200, seed=seed))
    start = time.perf_counter()
    count = 0
    while engine.busy:
        count += len(engine.step())
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8, help="requests decoded together in the batched row")
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=65)
    args = parser.parse_args()

    config = ModelConfig(
        block_size=args.block_size,
        vocab_size=args.vocab_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.inference_mode():
        tokens_per_second(model, 20, True)  # warm-up
        cached = tokens_per_second(model, args.new_tokens, True)
        batched = tokens_per_second(model, args.new_tokens, True, args.batch)
        full = tokens_per_second(model, args.new_tokens, False)
    print(
        f"{args.new_tokens} new tokens, {model.num_params() / 1e6:.1f}M parameters, "
        f"block_size {args.block_size}, on {machine()}, {today()}"
    )
    print(
        markdown_table(
            ["path", "tokens/s", "speed-up"],
            [
                [f"KV cache, batch {args.batch} (summed)", f"{batched:,.0f}", f"{batched / full:.1f}x"],
                ["KV cache, batch 1", f"{cached:,.0f}", f"{cached / full:.1f}x"],
                ["full recompute (nanoGPT), batch 1", f"{full:,.0f}", "1.0x"],
            ],
        )
    )


if __name__ == "__main__":
    main()
