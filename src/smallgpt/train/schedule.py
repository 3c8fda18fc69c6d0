"""Learning-rate schedules as pure functions of the iteration number (or of the time budget used)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from smallgpt.config import OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    """Warmup, then a cosine or warmup-stable-decay (wsd) decay to min_lr (or a constant
    learning_rate); names as OptimConfig's."""

    learning_rate: float
    min_lr: float
    warmup_iters: int = 0
    lr_decay_iters: int = 0
    decay_lr: bool = True
    lr_decay_by: str = "iters"  # iters | seconds: the decay follows the share of max_seconds used
    decay_shape: str = "cosine"  # cosine | wsd
    cooldown_frac: float = 0.2  # wsd: the last share of the decay span, a linear ramp to min_lr

    @classmethod
    def from_optim(cls, optim: OptimConfig) -> LRSchedule:
        return cls(**{f.name: getattr(optim, f.name) for f in fields(cls)})


def lr_at(it: int, schedule: LRSchedule, time_used: float | None = None) -> float:
    """Linear warmup to learning_rate, then decay to min_lr at lr_decay_iters, then flat.

    The decay is a cosine, or (wsd) the peak held until the last `cooldown_frac` of the span and a
    straight line down from there: a run that stops early has trained at the peak rate, and the
    short cooldown at the end takes most of the cosine's gain (Hägele et al. 2024).
    With `time_used` (the fraction of train.max_seconds spent, for lr_decay_by=seconds) the decay
    follows that fraction instead, so a run given N seconds ends its decay at N seconds whatever the
    machine's speed. Warmup stays in iterations: it is a few percent of the budget.
    """
    s = schedule
    if not s.decay_lr:
        return s.learning_rate
    if it < s.warmup_iters:
        return s.learning_rate * (it + 1) / (s.warmup_iters + 1)
    if time_used is not None:
        progress = min(1.0, time_used)
    elif it >= s.lr_decay_iters:
        return s.min_lr
    else:
        progress = (it - s.warmup_iters) / max(1, s.lr_decay_iters - s.warmup_iters)
    coeff = decay_coefficient(progress, s)  # 1 -> 0
    return s.min_lr + coeff * (s.learning_rate - s.min_lr)


def decay_coefficient(progress: float, schedule: LRSchedule) -> float:
    """The share of (learning_rate - min_lr) left at `progress` in [0, 1] through the decay."""
    if schedule.decay_shape == "wsd":
        return min(1.0, (1.0 - progress) / schedule.cooldown_frac)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
