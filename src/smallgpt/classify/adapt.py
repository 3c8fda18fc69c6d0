"""Domain-adaptive pre-training (`classify train --adapt-iters N`): before fine-tuning, the backbone
goes on with next-token training on the task's own training texts, never its val or test texts.

The adapted backbone is an ordinary smallgpt run folder (ckpt/, tokenizer.json, metrics.jsonl) that
`sample`, `eval` and `classify --init-from` all read; `ablate` adapts once and fine-tunes every
variant from it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from smallgpt.data.loader import BatchSampler
from smallgpt.data.tokenizers import Tokenizer
from smallgpt.io import atomic_write_bytes, folder_lock
from smallgpt.runs import load_run
from smallgpt.train.distributed import DistInfo
from smallgpt.train.optim import adamw, decay_groups
from smallgpt.train.schedule import LRSchedule
from smallgpt.train.trainer import LoopSettings, Trainer

EVALUATIONS = 5  # loss checks on the training texts over the run; the lowest picks ckpt/best


def training_stream(texts: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """The texts as one token stream, each followed by end-of-text, as `prepare` lays out a corpus."""
    pieces = []
    for text in texts:
        pieces += [tokenizer.encode_to_array(text, unknown="replace"), np.array([tokenizer.eot_id])]
    return np.concatenate(pieces).astype(np.int64)


def adapt_backbone(
    init_from: str | Path,
    texts: list[str],
    out_dir: Path,
    iters: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    dtype: str = "auto",
    progress: bool = True,
) -> Path:
    """Next-token training of `init_from`'s ckpt/best on `texts` for `iters` steps into the run
    folder `out_dir`, which it returns (ckpt/best: the lowest loss on the texts)."""
    backbone, tokenizer = load_run(init_from, device)
    tokens = training_stream(texts, tokenizer)
    block_size = backbone.config.block_size

    def sampler(sampler_seed: int) -> BatchSampler:
        return BatchSampler(tokens, block_size, batch_size, sampler_seed, device, name="the training texts")

    warmup = min(100, iters // 10)
    settings = LoopSettings(
        max_iters=iters,
        eval_interval=max(1, iters // EVALUATIONS),
        schedule=LRSchedule(learning_rate, learning_rate / 10, warmup, iters),
        eval_iters=10,
        dtype=dtype,
        log_interval=max(1, min(50, iters // 20)),
        progress=progress,
    )
    torch.manual_seed(seed)
    trainer = Trainer(
        settings,
        backbone.train(),
        backbone.config,
        adamw(decay_groups(backbone.parameters(), 0.1), learning_rate, device.type),
        sampler(seed),
        eval_sources={"train": lambda: sampler(seed + 1)},
        run_dir=out_dir,
        dist=DistInfo(False, 0, 0, 1, device),
        checkpoint_info={"tokenizer_fingerprint": tokenizer.fingerprint(), "adapted_from": str(init_from)},
        monitor="train_loss",
    )
    with folder_lock(out_dir):
        atomic_write_bytes(out_dir / "tokenizer.json", (Path(init_from) / "tokenizer.json").read_bytes())
        print(
            f"adapting {init_from} on {len(tokens):,} tokens of training text: {iters} steps into {out_dir}"
        )
        trainer.fit()
    return out_dir
