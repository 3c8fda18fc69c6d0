"""One place that knows whether this process is one of many (torchrun), which device it owns, and how
the model is shared between processes (DDP: a full copy each; FSDP: a shard each)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn

from smallgpt.device import resolve_device
from smallgpt.errors import UserError

COMPILE_BACKEND = "inductor"  # torch.compile's; gpu_check's CPU smoke run uses a faster one


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


def shutdown_distributed(info: DistInfo, finished: bool) -> None:
    """Leave the process group. After a finished run every rank first waits for the others: a rank
    that tears gloo down while a peer is still in a collective (FSDP gathers the last checkpoint)
    can abort. After an error there is no waiting, as a dead peer would never arrive."""
    if info.ddp and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, parallel: str, compile: bool
) -> nn.Module:
    """The module the training loop calls: compiled and/or wrapped for DDP, or sharded in place for FSDP."""
    if info.ddp and parallel == "fsdp":
        shard_model(model, optimizer)
        return compiled(model) if compile else model
    wrapped = compiled(model) if compile else model
    if info.ddp:  # DDP starts every rank from rank 0's weights
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids)
    return wrapped


def compiled(model: nn.Module) -> nn.Module:
    return cast(nn.Module, torch.compile(model, backend=COMPILE_BACKEND))  # calls the compiled forward


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """FSDP2: each transformer block, then the rest, keeps 1/world of its parameters on each rank.

    `fully_shard` replaces the parameters with sharded DTensors, so the optimizer (built on the plain
    model, still without state) is pointed at the new ones by name.
    """
    from smallgpt.model.gpt import Block

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UserError(f"parallel=fsdp needs FSDP2 (torch >= 2.6), not torch {torch.__version__}") from None
    names = {id(p): name for name, p in model.named_parameters()}
    for p in model.parameters():  # like DDP, start every rank from rank 0's weights
        dist.broadcast(p.detach(), src=0)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module)
    fully_shard(model)  # embeddings, final norm and the (tied) head
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]


def set_grad_sync(wrapped: nn.Module, enabled: bool) -> None:
    """Reduce gradients across ranks in the coming backward pass only if `enabled` (the last micro-step).

    Must be set before that micro-step's forward: DDP reads it there.
    """
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        wrapped.require_backward_grad_sync = enabled
        return
    model: Any = getattr(wrapped, "_orig_mod", wrapped)  # FSDP shards in place, then compile wraps
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is an FSDP2 root (its parameters are DTensor shards)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over all ranks (a collective: every rank must call it)."""
    if info.ddp:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def rank0_value(value: float, info: DistInfo) -> float:
    """Rank 0's `value` on every rank, so decisions taken from it (stop now?) agree everywhere."""
    if not info.ddp:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """`smallgpt train --nproc N ...` as a one-node torchrun command line."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a free port
        f"--nproc_per_node={nproc}",
        "-m",
        "smallgpt",
        "train",
        *train_args,
    ]
