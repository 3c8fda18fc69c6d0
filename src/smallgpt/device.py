"""Which torch device a command runs on: training, sampling, chat, classify and serving all ask here;
and whether a CPU computes in bfloat16 itself."""

from __future__ import annotations

import os
import shutil

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


def cpu_bf16_units() -> list[str]:
    """The CPU's native bfloat16 units as torch sees them (AVX512-BF16, AMX): none means emulated."""
    checks = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    return [unit for unit, check in checks.items() if getattr(torch.cpu, check, lambda: False)()]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively rather than emulating it."""
    return bool(cpu_bf16_units())


def cpu_can_compile() -> bool:
    """Whether torch.compile's CPU backend (inductor, which writes and builds C++) finds a compiler."""
    names = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return any(shutil.which(name) for name in names if name)
