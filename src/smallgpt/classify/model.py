"""A GPT with a classification head: the pooled final hidden state -> one logit per class.

Two ways to treat padding, the seed's ablation:
- `mask_padding=True`: padding is invisible. Attention is causal and never looks at a pad key, and
  pooling reads real tokens only, so a padded example gives the logits it gives alone (with right
  padding, or with rotary positions on either side).
- `mask_padding=False` (the seed's "no mask"): the model is not told where padding is. Pads (the
  end-of-text id) are attended to like text, and pooling reads the last position / all positions.

Echo (`echo_separator` set): the model reads `text SEP text` and pools over the second copy, whose
every token has seen the whole text once; a causal model otherwise sees only what came before a
token (the idea of Springer et al. 2024, "Repetition improves language model embeddings").

Windows (`max_windows` > 1): a text longer than the block is read as several windows (rows of the
batch, `text_of` naming each row's text); each window is pooled as a text would be, and a text's
pooled vectors are averaged before the head, so every window counts alike whatever its length.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallgpt.classify.data import Windows, check_windows
from smallgpt.errors import UserError
from smallgpt.model.gpt import GPT

POOLINGS = ("last", "mean", "meanmax")
PADDING_SIDES = ("right", "left")


@dataclass
class ClassifierConfig:
    """What, beyond the backbone's ModelConfig, rebuilds a trained classifier (saved as classify.json)."""

    num_classes: int
    pooling: str = "mean"  # last | mean | meanmax; mean is also the CLI default
    mask_padding: bool = True
    freeze_backbone: bool = False
    padding_side: str = "right"  # right | left
    echo_separator: int | None = None  # None: off; else read `text SEP text`, SEP this token id
    max_windows: int = 1  # windows a long text is read in (1: its first block_size tokens)
    window_stride: int | None = None  # tokens between window starts at most (None: half the block)

    def validate(self) -> None:
        if self.num_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.padding_side not in PADDING_SIDES:
            raise UserError(
                f"padding side must be one of {', '.join(PADDING_SIDES)}, got {self.padding_side!r}"
            )
        check_windows(self.max_windows, self.window_stride)
        if self.echo_separator is not None and self.max_windows > 1:
            raise UserError("echo reads a text twice inside one block: it cannot be read in windows too")

    def windows(self, block_size: int) -> Windows:
        """How this classifier reads a text, for a backbone of `block_size` (checked here)."""
        stride = max(block_size // 2, 1) if self.window_stride is None else self.window_stride
        return Windows(block_size, stride, self.max_windows)

    def to_dict(self) -> dict:
        return asdict(self)


def padding_attention_mask(real: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, T, T), True = may attend: causal, never to a pad key.

    Every position also sees itself, so a pad query has one key and softmax never divides by zero
    (its output is ignored by pooling anyway).
    """
    T = real.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()
    diagonal = torch.eye(T, dtype=torch.bool, device=real.device)
    return (causal & real[:, None, None, :]) | diagonal  # (B, 1, T, T)


class EchoBatch(NamedTuple):
    ids: torch.Tensor  # (B, T2) `text SEP text`, right-aligned, padded with SEP
    text: torch.Tensor  # (B, T2) True at both copies and the separator
    pooled: torch.Tensor  # (B, T2) True where pooling reads: each text token once
    first: torch.Tensor  # (B, T2) True at the first copy, the one the next-token loss reads


def echo(idx: torch.Tensor, text: torch.Tensor, separator: int, block_size: int) -> EchoBatch:
    """Padded ids (B, T) with text mask -> `text SEP text` per row, cut at block_size.

    Pooling reads each text token once: its repeat where the block holds one, else the token itself
    (a text longer than half the block has a tail with no room for its repeat).
    """
    order = torch.argsort((~text).to(torch.int8), dim=1, stable=True)  # text first, in its order
    compact = idx.gather(1, order)  # right-aligned whatever the padding side
    length = text.sum(1, keepdim=True)  # (B, 1)
    width = min(int(2 * length.max()) + 1, block_size)
    j = torch.arange(width, device=idx.device)  # (width,)
    source = torch.where(j < length, j, j - length - 1).clamp(0, idx.size(1) - 1)
    in_text = j < 2 * length + 1
    ids = torch.where(in_text & (j != length), compact.gather(1, source), separator)
    repeats = (width - length - 1).clamp(min=0).minimum(length)  # (B, 1): tokens with their repeat
    repeat = (j > length) & in_text
    unrepeated = (j < length) & (j >= repeats)
    return EchoBatch(ids, in_text, repeat | unrepeated, j < length)


def pooled_width(n_embd: int, pooling: str) -> int:
    return 2 * n_embd if pooling == "meanmax" else n_embd


def pool(hidden: torch.Tensor, real: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C): the last position with real[b, t] True, or their mean;
    meanmax -> (B, 2C): their mean beside their per-channel max (ULMFiT's concat pooling: the max
    keeps a strong local cue that a long text's mean dilutes)."""
    if pooling in ("mean", "meanmax"):
        weights = real.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if pooling == "mean":
            return mean
        # every text has a real token, so the max is over at least one finite value
        peak = hidden.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(1)
        return torch.cat([mean, peak], dim=-1)
    positions = torch.arange(real.size(1), device=real.device)
    last = torch.where(real, positions, -1).max(dim=1).values  # (B,) works for left and right padding
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def average_windows(pooled: torch.Tensor, text_of: torch.Tensor) -> torch.Tensor:
    """(W, C) pooled windows -> (B, C): the mean of each text's windows (text_of (W,) names them)."""
    counts = torch.bincount(text_of).to(pooled.dtype).unsqueeze(-1)  # (B, 1), every text has a window
    total = pooled.new_zeros(counts.size(0), pooled.size(1)).index_add_(0, text_of, pooled)
    return total / counts


class GPTClassifier(nn.Module):
    def __init__(self, backbone: GPT, config: ClassifierConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = backbone
        self.windows = config.windows(backbone.config.block_size)  # a bad stride fails here
        self.head = nn.Linear(pooled_width(backbone.config.n_embd, config.pooling), config.num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)  # the optimizer then only sees the head

    def read_in(self, max_windows: int) -> None:
        """Read long texts in up to `max_windows` windows from now on (eval and predict's override)."""
        self.config.max_windows = max_windows
        self.config.validate()
        self.windows = self.config.windows(self.backbone.config.block_size)

    def train(self, mode: bool = True) -> GPTClassifier:
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps dropout off: it is a fixed feature extractor
        return self

    def forward(
        self,
        idx: torch.Tensor,
        real: torch.Tensor,
        with_lm_loss: bool = False,
        text_of: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, num_classes) for padded ids idx (B, T); real (B, T) is True at text tokens.

        With text_of (W,), the W rows of idx are windows and text_of names each one's text: a text's
        pooled windows are averaged. with_lm_loss also returns the backbone's next-token loss over the
        texts (every window's), GPT-1's auxiliary fine-tuning objective: it keeps the backbone a
        language model while it learns the labels.
        """
        text = pooled = first = real
        if self.config.echo_separator is not None:
            block_size = self.backbone.config.block_size
            idx, text, pooled, first = echo(idx, real, self.config.echo_separator, block_size)
        attend = text
        if not self.config.mask_padding:  # the seed's "no mask": pads count as text everywhere
            attend, pooled = torch.ones_like(text), pooled | ~text
        # an unpadded batch needs no mask: plain causal attention takes the fast kernel
        attn_mask = None if bool(attend.all()) else padding_attention_mask(attend)
        with torch.no_grad() if self.config.freeze_backbone else contextlib.nullcontext():
            hidden = self.backbone.hidden_states(idx, attn_mask=attn_mask)  # (B, T, C)
        vectors = pool(hidden, pooled, self.config.pooling)
        if text_of is not None:
            vectors = average_windows(vectors, text_of)
        logits = self.head(vectors)
        if not with_lm_loss:
            return logits
        # the repeat is a copy, easy to predict, so the next-token loss reads the first copy only
        return logits, next_token_loss(self.backbone, hidden, idx, first)


def next_token_loss(
    backbone: GPT, hidden: torch.Tensor, idx: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of predicting each text token from the text before it (pads are skipped)."""
    pairs = text[:, :-1] & text[:, 1:]  # (B, T-1): position t predicts t+1, both text
    if not bool(pairs.any()):
        return hidden.new_zeros(())  # one-token texts: nothing to predict
    # the vocabulary projection is the costly part, so it runs on the text positions only
    logits = backbone.logits(hidden[:, :-1][pairs])  # (N, vocab)
    return F.cross_entropy(logits.float(), idx[:, 1:][pairs])
