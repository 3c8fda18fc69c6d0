"""TinyStories on CPU: which tokenizer and config give the lowest bits per byte for the same seconds.

Runs, each for the same training seconds (the lr decays over that budget, lr_decay_by=seconds):
- nanoGPT's CPU quick-start config on GPT-2 tokens (what nanoGPT's prepare.py would produce);
- configs/tinystories_cpu.yaml on char, bpe:4096 and GPT-2 tokens: same model, three vocabularies.
Losses of different tokenizers are compared in bits per byte of text (val_bpb). Prints a Markdown
table of the best validation point of each run, then samples from the tuned bpe:4096 run.

Offline, the corpus is the shared TinyStories validation prefix (800 KB: 1,000 stories); it is small
enough that these models overfit within minutes, which the best-checkpoint figures absorb.

    flock /tmp/smallgpt-bench.lock .venv/bin/python benchmarks/tinystories_cpu.py --seconds 240
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from pathlib import Path

from common import SHARED_DATA, machine, markdown_table, prepare_once, today

from smallgpt.config import load_config
from smallgpt.experiments.metrics import events
from smallgpt.generate import SampleArgs, sample
from smallgpt.train import checkpoint
from smallgpt.train.run import train

REPO = Path(__file__).resolve().parents[1]
STORIES = SHARED_DATA / "tinystories" / "tinystories_valid_prefix_eot.txt"
BASELINE = REPO / "configs" / "nanogpt_cpu_quickstart.yaml"
TUNED = REPO / "configs" / "tinystories_cpu.yaml"


def run(config: Path, data: Path, out: Path, seconds: float) -> dict:
    """Train `config` on `data` for `seconds`; the eval record with the lowest val loss, plus speed."""
    overrides = [
        f"--dataset={data}", f"--out_dir={out}", "--progress=false", f"--max_seconds={seconds}",
        "--lr_decay_by=seconds", "--max_iters=1000000", "--eval_interval=100", "--eval_iters=40",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        train(load_config(config, overrides))
    best = min(events(out, "eval"), key=lambda r: r["val_loss"])
    speeds = [r["tokens_per_sec"] for r in events(out, "train")[1:]]  # the first step warms up
    iters = checkpoint.load_state(out / "ckpt" / "last")["iter_num"]
    return {**best, "last_iter": iters, "tokens_per_sec": statistics.median(speeds) if speeds else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=STORIES, help="<|endoftext|>-separated stories")
    parser.add_argument("--seconds", type=float, default=240, help="training seconds per run")
    parser.add_argument("--work", type=Path, default=None, help="keep data and runs here (default: temp)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        data = {}
        with contextlib.redirect_stdout(io.StringIO()):
            for tokenizer in ("char", "bpe:4096", "gpt2"):
                data[tokenizer] = prepare_once(args.input, work / tokenizer.replace(":", ""), tokenizer)
        plan = [(BASELINE, "gpt2")] + [(TUNED, tokenizer) for tokenizer in ("char", "bpe:4096", "gpt2")]
        rows = []
        for config, tokenizer in plan:
            out = work / f"{config.stem}-{tokenizer.replace(':', '')}"
            r = run(config, data[tokenizer], out, args.seconds)
            print(f"{config.name} {tokenizer}: best val_loss {r['val_loss']:.4f}, bpb {r['val_bpb']:.4f}")
            rows.append(
                [config.relative_to(REPO), tokenizer, r["last_iter"], f"{r['tokens_per_sec']:,.0f}",
                 r["iter"], f"{r['val_loss']:.4f}", f"{r['val_bpb']:.4f}"]
            )  # fmt: skip
        caption = f"{args.input.name}, {args.seconds:.0f} training seconds per run; {machine()}; {today()}"
        print(f"\nTinyStories ({caption})\n")
        header = ["config", "tokenizer", "iters", "tokens/s", "best iter", "best val loss", "val bits/byte"]
        print(markdown_table(header, rows))
        print("\nsamples of configs/tinystories_cpu.yaml with bpe:4096 (best checkpoint, top-p 0.9):\n")
        sample(
            SampleArgs(
                run=str(work / f"{TUNED.stem}-bpe4096"), start="Once upon a time", num_samples=2,
                max_new_tokens=160, top_p=0.9, top_k=None, device="cpu",
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
