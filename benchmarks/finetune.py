"""Fine-tuning a run: full vs LoRA memory and speed, and what pre-training buys at equal compute.

1. Memory and speed (`--part memory`): a GPT-2-124M-shaped model (12 x 768, 1024 positions, vocab
   50304; random weights) takes AdamW steps on random tokens on the CPU, full fine-tune vs LoRA
   rank 8 (attn.c_attn and attn.c_proj, the default), at the same batch. Each measurement runs in
   a process of its own (peak RSS is per process), the two modes alternated over --repeats:
   trainable parameters, optimizer state bytes, peak RSS (ru_maxrss) and tokens/s (median).
2. Quality at equal compute (`--part quality`), on LCCC dialogues (../shared/data/chitchat_lccc,
   toy_train.txt; 10% of its dialogues held out) with loss on bot turns:
   (a) from scratch on the dialogues for PRETRAIN + FINETUNE steps (the total compute of (b));
   (a') from scratch on the dialogues for FINETUNE steps (the fine-tuning budget of (b));
   (b) a base pre-trained for PRETRAIN steps on general Chinese text (THUCNews, 西游记, Wikipedia
       sentences, Lu Xun), then a full fine-tune of FINETUNE steps on the dialogues (--lr);
   (c) the same base, then LoRA rank 8 on every Linear of the blocks for FINETUNE steps (--lora-lr).
   Every run has the same shape and batch; the table gives each one's wall-clock too. The
   tokenizer is a byte-level BPE trained on the general text (so every dialogue character
   encodes), the chat data takes it from the base run (`prepare --format chat --tokenizer-from`),
   and the base leaves room for the chat tokens (vocab_size padded to a multiple of 64).
   Reported: the best bot-turn val loss (ckpt/best) and greedy replies to the same five messages.
Prints Markdown tables; data and runs are kept in --work, and a second call reuses them.

    python benchmarks/finetune.py --part memory    # ~3 min, one thread
    python benchmarks/finetune.py --part quality --work /tmp/finetune   # ~50 min, one thread
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import SHARED_DATA, machine, markdown_table, today

from smallgpt.model.lora import LORA_LAYERS

GENERAL_TEXT = [
    "chinese_news/cnews.sample1000.txt",
    "chinese_novel/xiyouji.txt",
    "chinese_wiki/wiki_sentences_zh_cn.txt",
    "luxun/luxun_stories_essays.txt",
]
MESSAGES = ["你好", "今天天气怎么样", "你喜欢吃什么", "周末有什么打算", "晚安，明天见"]
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64)
BATCH = dict(batch_size=16, eval_iters=20, device="cpu", progress=False, log_interval=50)


# ---- 1. memory and speed ---------------------------------------------------------------------
def measure(mode: str, batch: int, block: int, steps: int) -> dict:
    """One process's numbers: `steps` timed optimizer steps after one warm-up step."""
    from smallgpt.config import OptimConfig
    from smallgpt.model.gpt import GPT, ModelConfig
    from smallgpt.model.lora import LoRAConfig, add_lora
    from smallgpt.train.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768))
    if mode == "lora":
        add_lora(model, LoRAConfig(rank=8))
    optimizer = build_optimizer(model, OptimConfig(), "cpu")
    tokens = torch.randint(0, 50304, (batch, block + 1))
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state
            seconds.append(time.perf_counter() - start)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_bytes": sum(t.numel() * t.element_size() for t in state),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "tokens_per_sec": batch * block / statistics.median(seconds),
    }


def memory_part(args: argparse.Namespace) -> str:
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.repeats):
        for mode in results:  # alternated, so load from other processes hits both alike
            command = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads)]
            command += ["--batch", str(args.batch)]
            command += ["--block", str(args.block), "--steps", str(args.steps)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(mode, results[mode][-1], flush=True)
    rows, median = [], {}
    for mode, runs in results.items():
        median[mode] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m = median[mode]
        rows.append(
            [
                "full fine-tune" if mode == "full" else "LoRA rank 8 (attn)",
                f"{m['trainable'] / 1e6:.2f}M",
                f"{m['optimizer_bytes'] / 2**20:.1f} MiB",
                f"{m['peak_rss'] / 2**30:.2f} GiB",
                f"{m['tokens_per_sec']:.0f}",
            ]
        )
    ratio_rss = median["lora"]["peak_rss"] / median["full"]["peak_rss"]
    ratio_speed = median["lora"]["tokens_per_sec"] / median["full"]["tokens_per_sec"]
    header = ["", "trainable parameters", "optimizer state", "peak RSS", "tokens/s"]
    return (
        f"GPT-2-124M shape, batch {args.batch} x {args.block} tokens, {args.steps} steps, median of "
        f"{args.repeats}, {args.threads} thread(s); {machine()}; {today()}\n\n"
        f"{markdown_table(header, rows)}\n\n"
        f"LoRA peak RSS / full: {ratio_rss:.2f}; LoRA tokens/s / full: {ratio_speed:.2f}"
    )


# ---- 2. quality at equal compute -------------------------------------------------------------
def train_once(run: Path, **settings) -> float:
    """Train into `run` unless it is finished; returns the training seconds (from metrics)."""
    import smallgpt

    if not (run / "done.json").is_file():
        start = time.perf_counter()
        smallgpt.train(out_dir=str(run), **BATCH, **settings)
        (run / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return json.loads((run / "done.json").read_text())["seconds"]


def best_val_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return min(r["val_loss"] for r in records if r["event"] == "eval" and r["iter"] > 0)


def replies(run: Path) -> list[str]:
    import smallgpt

    model = smallgpt.load(run, device="cpu")
    texts = [
        model.chat([{"role": "user", "content": m}], max_new_tokens=40, temperature=0.0) for m in MESSAGES
    ]
    return [text.strip().replace("\n", " ⏎ ").replace("|", "\\|") or "(empty)" for text in texts]


def quality_part(args: argparse.Namespace) -> str:
    import smallgpt
    from smallgpt.data.loader import open_dataset

    work = Path(args.work)
    text_dir = work / "general_text"  # links to the shared files: read in place, never copied
    text_dir.mkdir(parents=True, exist_ok=True)
    for name in GENERAL_TEXT:
        link = text_dir / Path(name).name
        if not link.exists():
            link.symlink_to(SHARED_DATA / name)
    general = work / "data" / "general"
    if not (general / "meta.json").is_file():
        smallgpt.prepare(text_dir, general, tokenizer=f"bpe:{args.vocab}")
    _, tokenizer = open_dataset(general)
    padded = 64 * -(-(tokenizer.vocab_size + 8) // 64)  # room for the chat tokens
    schedule = dict(warmup_iters=100, learning_rate=args.lr, min_lr=args.lr / 10, dropout=0.1)
    base = work / "runs" / "base"
    base_seconds = train_once(
        base, dataset=str(general), vocab_size=padded, max_iters=args.pretrain,
        lr_decay_iters=args.pretrain, eval_interval=args.pretrain // 2, **SHAPE, **schedule,
    )  # fmt: skip
    chat = work / "data" / "chat"
    if not (chat / "meta.json").is_file():
        dialogues = SHARED_DATA / "chitchat_lccc" / "toy_train.txt"
        smallgpt.prepare(dialogues, chat, format="chat", tokenizer_from=str(base), block_size=64)
    on_chat = dict(dataset=str(chat), loss_on="bot", **SHAPE)
    total = args.pretrain + args.finetune
    every = args.finetune // 4
    fine = dict(max_iters=args.finetune, lr_decay_iters=args.finetune, eval_interval=every, warmup_iters=50)
    runs = {
        "(a) scratch, pre-train + fine-tune steps": train_once(
            work / "runs" / "scratch", vocab_size=padded, max_iters=total, lr_decay_iters=total,
            eval_interval=every, **on_chat, **schedule,
        ),
        "(a') scratch, fine-tune steps": train_once(
            work / "runs" / "scratch_short", vocab_size=padded, **on_chat, **{**schedule, **fine},
        ),
        "(b) base + full fine-tune": train_once(
            work / "runs" / "full", init_from=str(base), learning_rate=args.lr, min_lr=args.lr / 10,
            dropout=0.1, **fine, **on_chat,
        ),
        "(c) base + LoRA rank 8": train_once(
            work / "runs" / "lora", init_from=str(base), lora_rank=8, lora_layers=",".join(LORA_LAYERS),
            learning_rate=args.lora_lr, min_lr=args.lora_lr / 10, dropout=0.0, **fine, **on_chat,
        ),
    }  # fmt: skip
    folders = dict(zip(runs, ("scratch", "scratch_short", "full", "lora")))
    rows, samples = [], []
    for name, seconds in runs.items():
        run = work / "runs" / folders[name]
        pre, pre_steps = (base_seconds, args.pretrain) if "base" in name else (0.0, 0)
        steps = total if folders[name] == "scratch" else pre_steps + args.finetune
        rows.append(
            [name, f"{best_val_loss(run):.4f}", steps, f"{pre + seconds:.0f} ({pre:.0f} + {seconds:.0f})"]
        )
        samples.append((name, replies(run)))
    a, a_short, b, c = (best_val_loss(work / "runs" / folders[name]) for name in runs)
    header = ["run", "best val loss (bot turns)", "optimizer steps", "seconds (pre-train + fine-tune)"]
    sample_rows = [[m, *(r[i] for _, r in samples)] for i, m in enumerate(MESSAGES)]
    return (
        f"{SHAPE['n_layer']} x {SHAPE['n_embd']}, block {SHAPE['block_size']}, batch "
        f"{BATCH['batch_size']}, {args.threads} thread(s); bpe:{args.vocab} on the general text; pre-train "
        f"{args.pretrain} steps, fine-tune {args.finetune}, lr {args.lr:g}; {machine()}; {today()}\n\n"
        f"{markdown_table(header, rows)}\n\n"
        f"(b) - (a): {b - a:+.4f} nats/token; (b) - (a'): {b - a_short:+.4f}; (c) - (a): {c - a:+.4f}; "
        f"(c) - (b): {c - b:+.4f}\n\n"
        f"Greedy replies:\n\n{markdown_table(['message', *runs], sample_rows)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("memory", "quality"), default="memory")
    parser.add_argument("--child", choices=("full", "lora"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="/tmp/smallgpt_finetune")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE ids of the general text's tokenizer")
    parser.add_argument("--pretrain", type=int, default=6000, help="optimizer steps of the base")
    parser.add_argument("--finetune", type=int, default=1000, help="optimizer steps on the dialogues")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak lr of the base, (a) and (b)")
    parser.add_argument("--lora-lr", type=float, default=5e-3, help="peak lr of (c)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.block, args.steps)))
    elif args.part == "memory":
        print(memory_part(args))
    else:
        print(quality_part(args))


if __name__ == "__main__":
    main()
