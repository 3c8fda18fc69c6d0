"""Lower-precision weights for inference: a loaded GPT in bfloat16, or with int8 Linear weights.

Decoding one token reads every weight once, so at small batch sizes its speed follows the bytes
of weights read: bfloat16 halves them, int8 quarters them. `int8` is weight-only quantization:
each Linear weight row (output channel) is stored as int8 times one scale (its largest absolute
value / 127); activations, norms, embeddings and the KV cache keep the model's dtype. On a CPU
the matmul of a few rows (decoding) is torch's int8-weight kernel (`_weight_int8pack_mm`, bfloat16
activations inside); many rows (a prompt) and other devices dequantize the weight on the fly, which
saves memory but not time.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from smallgpt.device import cpu_has_bf16
from smallgpt.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "int8")
M = TypeVar("M", bound=nn.Module)
INT8_KERNEL_ALIGN = 16  # the CPU kernel needs in_features divisible by this (wrong results otherwise)
# The CPU kernel's cost grows with every row, while dequantizing costs once per call: above this many
# rows (a prompt, a context refill) the fp32 matmul of the dequantized weight is faster (measured:
# docs/benchmarks.md, generation speed).
INT8_KERNEL_MAX_ROWS = 32


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (out, in) and one scale per output row."""

    weight: torch.Tensor
    scale: torch.Tensor
    scale_bf16: torch.Tensor

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): the row's max maps to 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))  # the CPU kernel's
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        aligned = self.in_features % INT8_KERNEL_ALIGN == 0
        if x.device.type == "cpu" and aligned and rows <= INT8_KERNEL_MAX_ROWS:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()  # (B*T, in)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale_bf16)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: M) -> M:
    """Replace every nn.Linear of `model` (in place) by an Int8Linear; returns the model.

    A head tied to the token embedding gets its own int8 copy: the embedding keeps its dtype.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model


def check_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for an inference dtype name; UserError if unknown or unsupported here."""
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bf16():
        raise UserError(
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX), where it would be slower than "
            "float32: use --dtype float32"
        )
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16: use --dtype float16 or float32")
    if dtype == "float16" and device.type == "cpu":
        raise UserError("float16 is for GPUs; on a CPU use --dtype bfloat16 or float32")
    return DTYPES[dtype]


def for_inference(model: M, dtype: str = "float32", quantize: str = "none") -> M:
    """`model` (in eval mode) cast to `dtype` and, with quantize="int8", with int8 Linear weights."""
    if quantize not in QUANTIZATIONS:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    device = next(model.parameters()).device
    model = model.to(check_dtype(dtype, device)).eval()
    return quantize_int8(model) if quantize == "int8" else model
