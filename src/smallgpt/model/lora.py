"""LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen Linear plus a trainable low-rank update.

`y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T`, A (rank, in) random, B (out, rank) zero, so
a fresh adapter leaves the model's outputs as they were. Only A and B train: an adapter checkpoint
is a few MB beside the base's hundreds, and the optimizer keeps state for them alone.

A small module of our own rather than `peft`: peft wraps the model in a PeftModel (new state-dict
names, `base_model.model.` prefixes), needs transformers, and its layer matching is by regex. Here a
LoRALinear *is* an nn.Linear: the base weights keep their names, the adapters add `lora_a`/`lora_b`
beside them, and `merge` folds them back into plain Linears for inference, export and quantizing.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallgpt.errors import UserError

# the Linear layers of a block, by their name inside it (attn.c_attn projects q, k and v at once)
LORA_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_KEYS = ("lora_a", "lora_b")
Model = TypeVar("Model", bound=nn.Module)


@dataclass
class LoRAConfig:
    """The adapters of a LoRA run (its checkpoints store them as the `lora` tag)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layers: str = "attn.c_attn,attn.c_proj"

    def layer_names(self) -> list[str]:
        return [name.strip() for name in self.layers.split(",") if name.strip()]

    def validate(self) -> None:
        if self.rank <= 0:
            raise UserError(f"lora_rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise UserError(f"lora_alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_names():
            raise UserError(f"lora_layers names no layer; choose from {', '.join(LORA_LAYERS)}")
        for name in self.layer_names():
            if name not in LORA_LAYERS:
                close = difflib.get_close_matches(name, LORA_LAYERS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise UserError(
                    f"lora_layers: no layer {name!r} in a block; {hint}choose from {', '.join(LORA_LAYERS)}"
                )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoRAConfig:
        return cls(**json.loads(text))


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias`, frozen) with a trainable rank-`rank` update beside it."""

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight only to drop it
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base's tensors, not copies
        self.requires_grad_(False)  # before the adapters exist: they alone train
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(config.rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, config.rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's (and peft's) init
        self.scaling = config.alpha / config.rank
        self.lora_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)  # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (without dropout): W + scaling * B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scaling * (self.lora_b @ self.lora_a))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _block_linears(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of each chosen Linear in every transformer block of a GPT."""
    found = []
    for block in model.transformer.h:  # type: ignore[union-attr]
        for name in names:
            part, attr = name.split(".")
            found.append((getattr(block, part), attr))
    return found


def add_lora(model: Model, config: LoRAConfig) -> Model:
    """Freeze every weight of the GPT `model` and put adapters on the chosen layers, in place."""
    config.validate()
    model.requires_grad_(False)
    for parent, attr in _block_linears(model, config.layer_names()):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config))
    return model


def merge_lora(model: Model) -> Model:
    """Fold every adapter into its Linear, in place: the model is a plain one again."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ADAPTER_KEYS
