"""Optimizers, chosen by name from the config (`optimizer: adamw | sophiag | muon`).

The trainer sets every group's lr to `schedule(it) * group["lr_scale"]`, so an optimizer whose groups
need different learning rates (Muon's matrices) says so with `lr_scale`. Two optional hooks:
`after_step(step, model, batch, autocast, grad_scale)`, called after every optimizer step with the
last micro-batch (SophiaG estimates its Hessian there), and `log_metrics()`, extra values to log.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn

from smallgpt.config import OptimConfig
from smallgpt.data.loader import Batch
from smallgpt.errors import UserError


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings, linear weights), none on biases and norm gains."""
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def betas(optim: OptimConfig, default: tuple[float, float]) -> tuple[float, float]:
    """The config's beta1/beta2 where set, else the optimizer's own defaults."""
    return (
        optim.beta1 if optim.beta1 is not None else default[0],
        optim.beta2 if optim.beta2 is not None else default[1],
    )


ADAMW_BETAS = (0.9, 0.95)


def adamw(
    groups: list[dict], lr: float, device_type: str, betas: tuple[float, float] = ADAMW_BETAS
) -> torch.optim.AdamW:
    # the fused kernel is one launch for all parameters; it exists for CUDA and CPU tensors
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def build_adamw(model: nn.Module, optim: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    groups = decay_groups(model.parameters(), optim.weight_decay)
    return adamw(groups, optim.learning_rate, device_type, betas(optim, ADAMW_BETAS))


class SophiaG(torch.optim.Optimizer):
    """SophiaG (Liu et al. 2023, arXiv:2305.14342): momentum divided by an EMA of the diagonal
    Hessian, clipped per coordinate to [-1, 1], times lr; decoupled weight decay as AdamW.

    The Hessian EMA is fed by `update_hessian`, called by `after_step` every `hessian_interval` steps
    right after a backward pass of the loss on labels sampled from the model's own predictions (the
    Gauss-Newton-Bartlett estimator: tokens * g * g for that loss's mean gradient g). Until the first
    estimate the Hessian is zero, so every coordinate is clipped: a sign-momentum step.

    Paper's guidance: lr about AdamW's (or a little lower), weight decay about 2x AdamW's, and a
    `rho` that keeps the win rate (share of coordinates not clipped) between 0.1 and 0.5.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        hessian_interval: int = 10,
        eps: float = 1e-15,
    ):
        if rho <= 0 or hessian_interval <= 0:
            raise UserError(f"sophiag needs rho > 0 and hessian_interval > 0, got {rho}, {hessian_interval}")
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps))
        self.hessian_interval = hessian_interval
        self._unclipped = torch.zeros(())  # coordinates not clipped at the last step, for the win rate
        self._numel = 0

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, tokens: int, grad_scale: float = 1.0) -> None:
        """Fold the current gradients (of a sampled-label loss averaged over `tokens`) into the EMA."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad.float() / grad_scale
                    self._state(p)["hessian"].mul_(beta2).addcmul_(g, g, value=(1 - beta2) * tokens)

    def after_step(
        self,
        step: int,
        model: nn.Module,
        batch: Batch,
        autocast: Callable[[], AbstractContextManager],
        grad_scale: float,
    ) -> None:
        """The trainer's hook after optimizer step `step` (counted from 1): every hessian_interval
        steps, the Gauss-Newton-Bartlett estimate on `batch` (inputs, targets, loss mask)."""
        if step % self.hessian_interval:
            return
        x, y, mask = batch
        with autocast():
            logits = model(x, y)[0]  # with targets, the model returns every position's logits
        sampled = torch.distributions.Categorical(logits=logits.float().detach()).sample()
        if mask is not None:  # only where the real loss counts (e.g. chat: the bot's turns)
            sampled = sampled.masked_fill(~mask.bool(), -1)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), sampled.flatten(), ignore_index=-1)
        (loss * grad_scale).backward()  # fp16: scaled like the training loss, so small grads survive
        self.update_hessian(tokens=int((sampled >= 0).sum()), grad_scale=grad_scale)
        self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        unclipped, numel = None, 0
        for group in self.param_groups:
            lr, beta1, rho = group["lr"], group["betas"][0], group["rho"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                m, h = state["exp_avg"], state["hessian"]
                p.mul_(1 - lr * group["weight_decay"])
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (m.abs() / (rho * h + group["eps"])).clamp_(max=1.0)
                p.addcmul_(m.sign(), ratio, value=-lr)
                count = (ratio < 1).sum()
                unclipped = count if unclipped is None else unclipped + count
                numel += ratio.numel()
        if unclipped is not None:  # kept as a tensor: reading it would wait for the GPU every step
            self._unclipped, self._numel = unclipped, numel
        return loss

    def log_metrics(self) -> dict[str, float]:
        return {"win_rate": self._unclipped.item() / self._numel} if self._numel else {}


def build_sophiag(model: nn.Module, optim: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    return SophiaG(
        decay_groups(model.parameters(), optim.weight_decay),
        lr=optim.learning_rate,
        betas=betas(optim, (0.965, 0.99)),
        rho=optim.rho,
        weight_decay=optim.weight_decay,
        hessian_interval=optim.hessian_interval,
    )


class CombinedOptimizer:
    """Several optimizers over disjoint parameters, stepped, zeroed and checkpointed as one."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            raise ValueError("CombinedOptimizer.step takes no closure")
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise UserError(
                f"checkpoint optimizer state has {sorted(state)}, expected {sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def hidden_matrices(model: nn.Module) -> list[torch.Tensor]:
    """Weights of the linear layers inside the network: not embeddings, nor the (tied) output head."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not name.endswith("head")
        and id(m.weight) not in embeddings
        and m.weight.requires_grad
    ]


def build_muon(model: nn.Module, optim: OptimConfig, device_type: str) -> CombinedOptimizer:
    """Muon (Newton-Schulz orthogonalised momentum, 5 steps) for the hidden matrices; AdamW for
    embeddings, head, norms and biases, as in the modded-nanogpt speedruns."""
    matrices = hidden_matrices(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    lr_scale = optim.muon_lr / optim.learning_rate if optim.learning_rate else 1.0
    muon = torch.optim.Muon(
        [{"params": matrices, "lr_scale": lr_scale}],  # the trainer's schedule times muon_lr / learning_rate
        lr=optim.muon_lr,
        weight_decay=optim.weight_decay,
        momentum=optim.muon_momentum,
        ns_steps=5,
    )
    rest_groups = decay_groups(rest, optim.weight_decay)
    rest_optimizer = adamw(rest_groups, optim.learning_rate, device_type, betas(optim, ADAMW_BETAS))
    # adamw first: its group is param_groups[0], whose lr the trainer logs (the schedule's own)
    return CombinedOptimizer({"adamw": rest_optimizer, "muon": muon})


OPTIMIZERS: dict[str, Callable[[nn.Module, OptimConfig, str], Any]] = {
    "adamw": build_adamw,
    "sophiag": build_sophiag,
    "muon": build_muon,
}


def check_optimizer(name: str) -> None:
    """UserError for an optimizer name we do not have, suggesting the closest one."""
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown optimizer {name!r}{hint} (choose one of {', '.join(sorted(OPTIMIZERS))})")


def build_optimizer(model: nn.Module, optim: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    check_optimizer(optim.optimizer)
    return OPTIMIZERS[optim.optimizer](model, optim, device_type)
