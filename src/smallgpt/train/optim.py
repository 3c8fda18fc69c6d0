"""Optimizers, chosen by name from the config (`optimizer: adamw`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from smallgpt.config import OptimConfig
from smallgpt.errors import UserError


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings, linear weights), none on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, optim: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    # the fused kernel is one launch for all parameters; it exists for CUDA and CPU tensors
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(
        decay_groups(model, optim.weight_decay),
        lr=optim.learning_rate,
        betas=(optim.beta1, optim.beta2),
        fused=fused,
    )


OPTIMIZERS: dict[str, Callable[[nn.Module, OptimConfig, str], torch.optim.Optimizer]] = {
    "adamw": build_adamw,
}


def build_optimizer(model: nn.Module, optim: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    if optim.optimizer not in OPTIMIZERS:
        raise UserError(
            f"unknown optimizer {optim.optimizer!r}; choose one of {', '.join(sorted(OPTIMIZERS))}"
        )
    return OPTIMIZERS[optim.optimizer](model, optim, device_type)
