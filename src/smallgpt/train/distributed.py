"""One place that knows whether this process is one of many (torchrun) and which device it owns."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from smallgpt.errors import UserError


@dataclass
class DistInfo:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
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


def init_distributed(device_name: str, backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the torchrun process group when RANK/WORLD_SIZE are set; otherwise one plain process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(False, 0, 0, 1, resolve_device(device_name))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    # a finite timeout turns a dead peer into an error instead of a hang
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(True, rank, local_rank, world, device)


def shutdown_distributed(info: DistInfo) -> None:
    if info.ddp and dist.is_initialized():
        dist.destroy_process_group()
