"""`smallgpt eval`: how well models predict a text: loss, perplexity and bits per byte.

Each text is tokenized with each model's own tokenizer and scored with sliding windows of the
model's context (the Hugging Face perplexity recipe): the first window scores all its tokens, each
later one moves `stride` tokens on and scores only its last `stride` tokens, the ones before being
context. Every token is scored exactly once; stride = block_size gives the non-overlapping windows
of training's evaluation; a smaller stride gives each token more context (a lower loss for a model
that uses its context well; an undertrained one can score worse at late positions).

A document is scored after an end-of-text token, its first context: training data puts one
between documents, so that is how a model has seen texts begin. The closing end-of-text is not
scored: the figures are about the text. Bits per byte (total nats / ln 2 / the text's UTF-8 bytes)
does not depend on the tokenizer, so it compares a char model with a GPT-2 BPE model.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F

from smallgpt.data.sources import ReadOptions
from smallgpt.data.tokenizers import UNK, Tokenizer
from smallgpt.device import resolve_device
from smallgpt.errors import UserError
from smallgpt.io import atomic_write_json, check_file_target
from smallgpt.model.gpt import GPT
from smallgpt.progress import progress_bar
from smallgpt.runs import Precision, load_source


@dataclass
class Score:
    """Sums over the scored tokens of one or more documents."""

    nats: float = 0.0  # total negative log-likelihood
    tokens: int = 0
    bytes: int = 0  # UTF-8 bytes of the text
    unknown_chars: int | None = None  # characters a char tokenizer never saw, scored as <|unk|>
    documents: int = 0

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes


def default_stride(block_size: int) -> int:
    return max(1, block_size // 2)


def check_settings(stride: int | None, batch_size: int) -> None:
    if stride is not None and stride <= 0:
        raise UserError(f"--stride must be positive, got {stride}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")


def check_stride(stride: int, block_size: int, model_name: str) -> None:
    if stride > block_size:
        raise UserError(f"--stride {stride} is longer than {model_name}'s context of {block_size} tokens")


def windows(n_targets: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) of each window over positions 0..n_targets-1.

    A window feeds positions [start, end) and scores the targets of [first_scored, end); the first
    window scores all of its positions, each later one only those after the previous window.
    """
    spans: list[tuple[int, int, int]] = []
    start = scored_to = 0
    while scored_to < n_targets:
        end = min(start + block_size, n_targets)
        spans.append((start, end, scored_to))
        start, scored_to = start + stride, end
    return spans


@torch.no_grad()
def sum_nats(model: GPT, sequences: Sequence[np.ndarray], stride: int, batch_size: int, bar=None) -> float:
    """Total negative log-likelihood of every token after the first of each sequence."""
    block_size, device = model.config.block_size, model.lm_head.weight.device
    jobs = [(seq, *w) for seq in sequences for w in windows(len(seq) - 1, block_size, stride)]
    total = 0.0
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        width = max(end - start for _, start, end, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)  # right padding: causal attention ignores it
        y = torch.full((len(batch), width), -1, dtype=torch.long)  # -1: not scored
        for row, (seq, start, end, first) in enumerate(batch):
            x[row, : end - start] = torch.from_numpy(seq[start:end])
            y[row, first - start : end - start] = torch.from_numpy(seq[first + 1 : end + 1])
        x, y = x.to(device), y.to(device)
        hidden = model.hidden_states(x)  # (B, T, C)
        scored = y >= 0
        logits = model.logits(hidden[scored]).float()  # (scored tokens, vocab): not the padding's
        total += F.cross_entropy(logits, y[scored], reduction="sum").item()
        if bar is not None:
            bar.update(len(batch))
    return total


def encode_document(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, int]:
    """([end-of-text, *ids of text], how many characters were read as <|unk|>): characters a char
    tokenizer never saw, as every surface reads them (`Tokenizer.encode_user_text`)."""
    ids, unseen = tokenizer.encode_user_text(text)
    return np.concatenate(([tokenizer.eot_id], ids)).astype(np.int64), unseen.count


def score_documents(
    model: GPT,
    tokenizer: Tokenizer,
    documents: Iterable[str],
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    name: str = "model",
) -> Score:
    """Score texts with a model: each one a document, in sliding windows (see the module doc).

    The one scoring function of `smallgpt eval` and the Python API's `Model.score`.
    """
    check_settings(stride, batch_size)
    block_size = model.config.block_size
    stride = default_stride(block_size) if stride is None else stride
    check_stride(stride, block_size, name)
    unk = tokenizer.special_tokens.get(UNK)  # only char tokenizers have one
    score, sequences, unknown = Score(), [], 0
    for text in documents:
        ids, unknown_here = encode_document(tokenizer, text)
        if len(ids) < 2:  # nothing to score
            continue
        sequences.append(ids)
        score.tokens += len(ids) - 1
        score.bytes += len(text.encode("utf-8"))
        score.documents += 1
        unknown += unknown_here
    score.unknown_chars = None if unk is None else unknown
    if not score.tokens:
        raise UserError("there is no text to score")
    n_windows = sum(len(windows(len(s) - 1, block_size, stride)) for s in sequences)
    with progress_bar(progress and n_windows > batch_size, total=n_windows, unit="window", desc=name) as bar:
        score.nats = sum_nats(model, sequences, stride, batch_size, bar)
    return score


# ---- the verb -----------------------------------------------------------------------------------


@dataclass
class EvalArgs(ReadOptions, Precision):
    run: list[str] = field(
        default_factory=list, metadata={"help": "a run folder made by smallgpt train (repeat for several)"}
    )
    init_from: list[str] = field(
        default_factory=list,
        metadata={"help": "gpt2, gpt2-medium, gpt2-large, gpt2-xl or a transformers folder (repeatable)"},
    )
    input: list[str] = field(
        default_factory=list,
        metadata={"help": "a file or folder to score, read as prepare reads it (repeatable)"},
    )
    stride: int | None = field(
        default=None,
        metadata={"help": "tokens each window moves on, 1 to block_size (default: half of block_size)"},
    )
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    checkpoint: str = field(default="best", metadata={"help": "which checkpoint of a run: best | last"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    json: str | None = field(default=None, metadata={"help": "also write the results to this JSON file"})


@dataclass
class Result:
    model: str
    tokenizer: str
    input: str
    block_size: int
    stride: int
    score: Score

    def to_dict(self) -> dict[str, Any]:
        s = self.score
        return {
            "model": self.model,
            "tokenizer": self.tokenizer,
            "input": self.input,
            "block_size": self.block_size,
            "stride": self.stride,
            "documents": s.documents,
            "tokens": s.tokens,
            "bytes": s.bytes,
            "nats": s.nats,
            "loss": s.loss,
            "perplexity": s.perplexity,
            "bits_per_byte": s.bits_per_byte,
            "unknown_chars": s.unknown_chars,
        }


def read_inputs(args: EvalArgs) -> dict[str, list[str]]:
    """The documents of each input, read the way `prepare` reads them (so errors come before loading)."""
    return {path: list(args.open(None, path).documents()) for path in args.input}


def run_eval(args: EvalArgs, out: TextIO | None = None) -> list[Result]:
    """Score every input with every model; print one table (and write --json)."""
    out = out or sys.stdout
    if not args.input:
        raise UserError("pass at least one --input FILE_OR_FOLDER to score")
    if not args.run and not args.init_from:
        raise UserError("pass at least one --run DIR or --init-from MODEL to evaluate")
    check_settings(args.stride, args.batch_size)
    if args.json:  # before the scoring, which may take long
        check_file_target(args.json)
    inputs = read_inputs(args)
    device = resolve_device(args.device)
    models = [(run, "") for run in args.run] + [("", name) for name in args.init_from]
    results = []
    for run, init_from in models:
        model, tokenizer = load_source(run, init_from, args.checkpoint, device, args.dtype, args.quantize)
        name = run or init_from
        stride = default_stride(model.config.block_size) if args.stride is None else args.stride
        for path, documents in inputs.items():
            score = score_documents(model, tokenizer, documents, stride, args.batch_size, True, name)
            results.append(Result(name, tokenizer.kind, path, model.config.block_size, stride, score))
        del model  # one model in memory at a time
    out.write(format_table(results))
    if args.json:
        atomic_write_json(args.json, [r.to_dict() for r in results])
    return results


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path by its shortest ending that no other path shares (`runs/a`, `/x/b/run`: `a`, `run`),
    so a table of absolute paths stays narrow; a path that ends another one stays whole."""
    parts = {path: Path(path).parts for path in dict.fromkeys(paths)}
    names = {}
    for path, mine in parts.items():
        others = [theirs for other, theirs in parts.items() if other != path and theirs != mine]
        ends = (mine[-n:] for n in range(1, len(mine) + 1))
        unique = next((end for end in ends if all(theirs[-len(end) :] != end for theirs in others)), None)
        names[path] = str(Path(*unique)) if unique and len(unique) < len(mine) else path
    return names


def format_table(results: list[Result]) -> str:
    """Models x inputs, one row each, columns aligned; models and inputs by their short names (the
    full paths are in --json)."""
    header = ["model", "tokenizer", "input", "context/stride", "tokens", "loss", "ppl", "bits/byte", "unk"]
    rows = [header]
    models = short_names([r.model for r in results])
    inputs = short_names([r.input for r in results])
    for r in results:
        s = r.score
        rows.append(
            [
                models[r.model],
                r.tokenizer,
                inputs[r.input],
                f"{r.block_size}/{r.stride}",
                f"{s.tokens:,}",
                f"{s.loss:.4f}",
                f"{s.perplexity:.2f}",
                f"{s.bits_per_byte:.4f}",
                "-" if s.unknown_chars is None else f"{s.unknown_chars:,}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    text_columns = 3  # left-aligned; the numbers are right-aligned
    lines = [
        "  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.append(
        "loss: nats per token; bits/byte: total nats / ln 2 / UTF-8 bytes of the text (compares tokenizers)"
    )
    if any(r.score.unknown_chars for r in results):
        lines.append(
            f"unk: characters the char tokenizer never saw; each is scored as {UNK}, a token the model "
            "never saw in training (so a costly one)"
        )
    return "\n".join(lines) + "\n"
