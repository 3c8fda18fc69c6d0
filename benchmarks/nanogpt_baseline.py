"""nanoGPT's CPU quick start, restated: the baseline of benchmarks/train_cpu.py --compare.

NOT nanoGPT's code. nanoGPT (github.com/karpathy/nanoGPT, MIT) is not vendored in this repository
and cannot be fetched here, so this file re-states, in our own words, what its `train.py` and
`model.py` do for

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

so that the comparison can be rerun. What it reproduces:
- the model: token + learned position embeddings, pre-LayerNorm blocks (LayerNorm and Linear
  biases off: train.py's default `bias = False`), attention through F.scaled_dot_product_attention
  with is_causal=True, a 4x GELU (exact) MLP, final LayerNorm, the head tied to the token embedding;
  N(0, 0.02) init, residual projections N(0, 0.02 / sqrt(2 * n_layer)); all in float32, no compile.
- `get_batch`: re-opens the split's np.memmap on every call, draws starts with torch.randint,
  stacks one int64 copy per row for inputs and one for targets.
- the loop: lr warmup (it + 1) / (warmup + 1) then cosine to min_lr; every eval_interval iterations
  (from 0) `estimate_loss` (eval_iters batches of each split, .item() per batch) and a torch.save
  of model + optimizer when val loss improves (after iteration 0); the next batch is fetched right
  after the forward; backward; clip_grad_norm_(1.0); AdamW (weight decay 0.1 on tensors of rank >= 2,
  0 on the rest, betas (0.9, 0.99), fused=False on CPU, PyTorch's default foreach choice);
  zero_grad(set_to_none=True); loss.item() and a printed line (with its MFU estimate after 5
  iterations) every log_interval; it stops after iteration max_iters, so it takes max_iters + 1
  optimizer steps and evaluates at 0, 250, ..., max_iters.
- the data: any prepared smallgpt data folder (train.bin / val.bin, dtype and vocab_size from its
  meta.json, where nanoGPT reads meta.pkl and assumes uint16).

    python benchmarks/nanogpt_baseline.py --data DATA_DIR [--max_iters 2000] [--out_dir DIR]
        [--n_layer 6 --n_embd 384 ...: any Settings field, as nanoGPT's --key=value overrides]

Prints its log lines and, last, one JSON line: iterations, tokens, seconds (wall), train_seconds
(without evaluation and checkpointing), tokens_per_sec and the final val loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Settings:
    """The quick start's values (config/train_shakespeare_char.py plus its command line)."""

    block_size: int = 64
    batch_size: int = 12
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    max_iters: int = 2000
    lr_decay_iters: int = 2000
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 1
    seed: int = 1337


# ---- the model ---------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, s: Settings):
        super().__init__()
        self.n_head, self.dropout = s.n_head, s.dropout
        self.c_attn = nn.Linear(s.n_embd, 3 * s.n_embd, bias=s.bias)
        self.c_proj = nn.Linear(s.n_embd, s.n_embd, bias=s.bias)
        self.resid_dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    def __init__(self, s: Settings):
        super().__init__()
        self.ln_1 = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.attn = Attention(s)
        self.ln_2 = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.c_fc = nn.Linear(s.n_embd, 4 * s.n_embd, bias=s.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * s.n_embd, s.n_embd, bias=s.bias)
        self.mlp_dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_dropout(self.c_proj(self.gelu(self.c_fc(self.ln_2(x)))))


class BaselineGPT(nn.Module):
    def __init__(self, s: Settings, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, s.n_embd)
        self.wpe = nn.Embedding(s.block_size, s.n_embd)
        self.drop = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd, bias=s.bias)
        self.lm_head = nn.Linear(s.n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * s.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, dtype=torch.long, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def mfu(self, s: Settings, seconds_per_iter: float) -> float:
        """nanoGPT's estimate against an A100's 312 TFLOP/s (printed, as nanoGPT prints it)."""
        n = sum(p.numel() for p in self.parameters())
        flops_per_token = 6 * n + 12 * s.n_layer * s.n_head * (s.n_embd // s.n_head) * s.block_size
        return flops_per_token * s.block_size * s.batch_size / seconds_per_iter / 312e12


# ---- the loop ----------------------------------------------------------------------------------
def get_batch(data_dir: str, split: str, dtype: str, s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.dtype(dtype), mode="r")
    ix = torch.randint(len(data) - s.block_size, (s.batch_size,))
    x = torch.stack([torch.from_numpy(data[i : i + s.block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + s.block_size].astype(np.int64)) for i in ix])
    return x, y


def get_lr(it: int, s: Settings) -> float:
    if it < s.warmup_iters:
        return s.learning_rate * (it + 1) / (s.warmup_iters + 1)
    if it > s.lr_decay_iters:
        return s.min_lr
    ratio = (it - s.warmup_iters) / (s.lr_decay_iters - s.warmup_iters)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.learning_rate - s.min_lr)


@torch.no_grad()
def estimate_loss(model: BaselineGPT, data_dir: str, dtype: str, s: Settings) -> dict[str, float]:
    out = {}
    model.eval()
    for split in ("train", "val"):
        losses = torch.zeros(s.eval_iters)
        for k in range(s.eval_iters):
            losses[k] = model(*get_batch(data_dir, split, dtype, s)).item()
        out[split] = losses.mean().item()
    model.train()
    return out


def train(data_dir: str, out_dir: str, s: Settings) -> dict[str, float]:
    start = time.perf_counter()  # as benchmarks/train_cpu.py times smallgpt's train(): all of it
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    dtype = meta["dtype"]
    torch.manual_seed(s.seed)
    model = BaselineGPT(s, meta["vocab_size"])
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), fused=False)
    x, y = get_batch(data_dir, "train", dtype, s)
    t0, iter_num, best_val, losses, train_seconds = time.perf_counter(), 0, 1e9, {}, 0.0
    while True:
        lr = get_lr(iter_num, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % s.eval_interval == 0:
            losses = estimate_loss(model, data_dir, dtype, s)
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val:
                best_val = losses["val"]
                if iter_num > 0:
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                    torch.save(state, os.path.join(out_dir, "ckpt.pt"))
            t0 = time.perf_counter()  # evaluation is not training time
        loss = model(x, y)
        x, y = get_batch(data_dir, "train", dtype, s)
        loss.backward()
        if s.grad_clip != 0.0:
            nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        dt, t0 = t1 - t0, t1
        train_seconds += dt
        if iter_num % s.log_interval == 0:
            mfu = model.mfu(s, dt) if iter_num >= 5 else -1.0
            print(f"iter {iter_num}: loss {loss.item():.4f}, time {dt * 1000:.2f}ms, mfu {mfu * 100:.2f}%")
        iter_num += 1
        if iter_num > s.max_iters:
            break
    tokens = iter_num * s.batch_size * s.block_size
    seconds = time.perf_counter() - start
    return {
        "iterations": iter_num,
        "tokens": tokens,
        "seconds": seconds,
        "train_seconds": train_seconds,
        "tokens_per_sec": tokens / train_seconds,
        "val_loss": losses["val"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, help="a prepared data folder (train.bin, val.bin, meta.json)"
    )
    parser.add_argument("--out_dir", default=None, help="where ckpt.pt goes (default: a temp folder)")
    for name, default in vars(Settings()).items():  # nanoGPT's configurator: any setting by name
        kind = (lambda v: v.lower() == "true") if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name}", type=kind, default=default)
    parser.set_defaults(lr_decay_iters=None)
    args = parser.parse_args()
    settings = {name: getattr(args, name) for name in vars(Settings())}
    s = Settings(**{**settings, "lr_decay_iters": args.lr_decay_iters or args.max_iters})
    with tempfile.TemporaryDirectory() as tmp:
        result = train(args.data, args.out_dir or tmp, s)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
