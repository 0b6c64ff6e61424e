"""Multi-process training under ``torchrun``: process group, device and reductions.

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a
no-op and training runs in one process exactly as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..device import launched_by_torchrun, pick_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA), or stay single-process."""
    if not launched_by_torchrun():
        return DistContext(), pick_device(device_name)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A lost peer surfaces as an error within the timeout instead of a hang forever;
        # torchrun also ends the other ranks as soon as one exits with an error.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=10))
    return DistContext(rank, world_size, local_rank), device


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
