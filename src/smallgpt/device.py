"""Which torch device a command runs on: training, sampling, chat, classify and serving all ask here.

Also how a CPU multiplies fp32 matrices: `cpu_bf16_matmuls()` lets oneDNN round their inputs to
bfloat16 (products accumulate in fp32), the CPU's counterpart of TF32 on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from smallgpt.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA, else Apple's MPS, else the CPU; under torchrun the rank's own GPU) or a named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but this torch sees no CUDA GPU")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX) rather than emulating it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@contextlib.contextmanager
def cpu_matmul_precision(precision: str) -> Iterator[None]:
    """Within the block, fp32 matmuls on the CPU take `precision`: "bf16" (inputs rounded to
    bfloat16, fp32 accumulation) or "ieee" (full fp32). Autograd's backward inherits it when it
    runs inside the block."""
    settings = _mkldnn_matmul()
    previous = settings.fp32_precision
    settings.fp32_precision = precision
    try:
        yield
    finally:
        settings.fp32_precision = previous


def cpu_bf16_matmuls() -> bool:
    """Whether fp32 matmuls on the CPU currently round their inputs to bfloat16."""
    return _mkldnn_matmul().fp32_precision == "bf16"


def _mkldnn_matmul() -> Any:
    return getattr(torch.backends.mkldnn, "matmul")  # noqa: B009 (torch's type stubs lack it)
