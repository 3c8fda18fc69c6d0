"""Sampling from a trained run through `smallgpt.generate.Generator`."""

import itertools

import torch

from smallgpt.config import load_config
from smallgpt.generate import Generator, SamplingOptions
from smallgpt.preparation import PrepareArgs, run_prepare
from smallgpt.train.run import train


def test_never_samples_embedding_rows_past_the_tokenizer(tmp_path, shared_data):
    """A vocabulary padded past the tokenizer's (GPT-2's 50257 -> 50304) leaves rows with no text:
    sampling one crashed decoding (tiktoken KeyError, char IndexError)."""
    data, run = tmp_path / "data", tmp_path / "run"
    run_prepare(PrepareArgs(input=str(shared_data / "tinyshakespeare" / "input.txt"), out=str(data)))
    overrides = [
        f"--dataset={data}",
        f"--out_dir={run}",
        "--vocab_size=80",
        "--max_iters=2",
        "--eval_iters=1",
    ]
    tiny = ["--block_size=16", "--n_layer=1", "--n_head=2", "--n_embd=16", "--progress=false", "--device=cpu"]
    train(load_config(None, overrides + tiny))
    gen = Generator(str(run), SamplingOptions(temperature=0, max_new_tokens=10, device="cpu"))
    padding = list(range(gen.tokenizer.vocab_size, 80))
    assert padding  # the char vocabulary of tiny shakespeare is 67 ids
    with torch.no_grad():  # make every position's hidden state v, and the padding rows' logits huge
        v = torch.randn(16)
        gen.model.transformer.ln_f.weight.zero_()
        gen.model.transformer.ln_f.bias.copy_(v)
        gen.model.lm_head.weight[padding] = 10 * v
    ids = list(itertools.islice(gen.stream(gen.encode_prompt("ROMEO:"), stop_ids=()), 10))
    assert len(ids) == 10 and max(ids) < gen.tokenizer.vocab_size
    assert gen.tokenizer.decode(ids)
