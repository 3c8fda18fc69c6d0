"""A GPT with a classification head: the pooled final hidden state -> one logit per class.

Two ways to treat padding, the seed's ablation:
- `mask_padding=True`: padding is invisible. Attention is causal and never looks at a pad key, and
  pooling reads real tokens only, so a padded example gives the logits it gives alone (with right
  padding, or with rotary positions on either side).
- `mask_padding=False` (the seed's "no mask"): the model is not told where padding is. Pads (the
  end-of-text id) are attended to like text, and pooling reads the last position / all positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    def validate(self) -> None:
        if self.num_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.padding_side not in PADDING_SIDES:
            raise UserError(
                f"padding side must be one of {', '.join(PADDING_SIDES)}, got {self.padding_side!r}"
            )

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


class GPTClassifier(nn.Module):
    def __init__(self, backbone: GPT, config: ClassifierConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = backbone
        self.head = nn.Linear(pooled_width(backbone.config.n_embd, config.pooling), config.num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)  # the optimizer then only sees the head

    def train(self, mode: bool = True) -> GPTClassifier:
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps dropout off: it is a fixed feature extractor
        return self

    def forward(
        self, idx: torch.Tensor, real: torch.Tensor, with_lm_loss: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, num_classes) for padded ids idx (B, T); real (B, T) is True at text tokens.

        with_lm_loss also returns the backbone's next-token loss over the texts, GPT-1's auxiliary
        fine-tuning objective: it keeps the backbone a language model while it learns the labels.
        """
        text = real
        if not self.config.mask_padding:
            real = torch.ones_like(real)  # the seed's "no mask": pads count as text everywhere
        # an unpadded batch needs no mask: plain causal attention takes the fast kernel
        attn_mask = None if bool(real.all()) else padding_attention_mask(real)
        with torch.no_grad() if self.config.freeze_backbone else contextlib.nullcontext():
            hidden = self.backbone.hidden_states(idx, attn_mask=attn_mask)  # (B, T, C)
        logits = self.head(pool(hidden, real, self.config.pooling))
        if not with_lm_loss:
            return logits
        return logits, next_token_loss(self.backbone, hidden, idx, text)


def next_token_loss(
    backbone: GPT, hidden: torch.Tensor, idx: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of predicting each text token from the text before it (pads are skipped)."""
    pairs = text[:, :-1] & text[:, 1:]  # (B, T-1): position t predicts t+1, both text
    if not bool(pairs.any()):
        return hidden.new_zeros(())  # one-token texts: nothing to predict
    # the vocabulary projection is the costly part, so it runs on the text positions only
    logits = backbone.lm_head(hidden[:, :-1][pairs])  # (N, vocab)
    return F.cross_entropy(logits.float(), idx[:, 1:][pairs])
