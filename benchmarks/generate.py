"""Generation speed with and without the KV cache.

    python benchmarks/generate.py [--new-tokens 500] [--n_layer 6 --n_embd 384 --block_size 256]

A randomly initialised GPT of nanoGPT's shakespeare size (speed does not depend on the weights)
continues a 1-token prompt; tokens/s for the cached and the full-recompute paths.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, markdown_table, today

from smallgpt.model.gpt import GPT, ModelConfig


def tokens_per_second(model: GPT, new_tokens: int, use_cache: bool) -> float:
    prompt = torch.zeros((1, 1), dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    count = sum(
        1 for _ in model.generate_stream(prompt, new_tokens, generator=generator, use_cache=use_cache)
    )
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=500)
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
        full = tokens_per_second(model, args.new_tokens, False)
    print(
        f"{args.new_tokens} new tokens, {model.num_params() / 1e6:.1f}M parameters, "
        f"block_size {args.block_size}, on {machine()}, {today()}"
    )
    print(
        markdown_table(
            ["path", "tokens/s", "speed-up"],
            [
                ["KV cache", f"{cached:,.0f}", f"{cached / full:.1f}x"],
                ["full recompute (nanoGPT)", f"{full:,.0f}", "1.0x"],
            ],
        )
    )


if __name__ == "__main__":
    main()
