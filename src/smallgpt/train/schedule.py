"""Learning-rate schedules as pure functions of the iteration number (or of the time budget used)."""

from __future__ import annotations

import math

from smallgpt.config import OptimConfig


def lr_at(it: int, optim: OptimConfig, time_used: float | None = None) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters, then flat.

    With `time_used` (the fraction of train.max_seconds spent, for lr_decay_by=seconds) the cosine
    follows that fraction instead, so a run given N seconds ends its decay at N seconds whatever the
    machine's speed. Warmup stays in iterations: it is a few percent of the budget.
    """
    if not optim.decay_lr:
        return optim.learning_rate
    if it < optim.warmup_iters:
        return optim.learning_rate * (it + 1) / (optim.warmup_iters + 1)
    if time_used is not None:
        progress = min(1.0, time_used)
    elif it >= optim.lr_decay_iters:
        return optim.min_lr
    else:
        progress = (it - optim.warmup_iters) / max(1, optim.lr_decay_iters - optim.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return optim.min_lr + coeff * (optim.learning_rate - optim.min_lr)
