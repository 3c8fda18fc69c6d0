"""Learning-rate schedules as pure functions of the iteration number."""

from __future__ import annotations

import math

from smallgpt.config import OptimConfig


def lr_at(it: int, optim: OptimConfig) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then flat."""
    if not optim.decay_lr:
        return optim.learning_rate
    if it < optim.warmup_iters:
        return optim.learning_rate * (it + 1) / (optim.warmup_iters + 1)
    if it >= optim.lr_decay_iters:
        return optim.min_lr
    progress = (it - optim.warmup_iters) / max(1, optim.lr_decay_iters - optim.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return optim.min_lr + coeff * (optim.learning_rate - optim.min_lr)
