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

from .errors import VitMqaError


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


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU if there is one, else MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise VitMqaError(f"unknown device {name!r}: choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise VitMqaError(f"device {name!r} asked for, but MPS is not available")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VitMqaError(f"device {name!r} asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


# The CPU flags (Linux's /proc/cpuinfo) of hardware bf16 matrix products, most capable
# first: Intel's AMX tiles, then AVX-512's bf16 dot products (AMD Zen 4 and later, some
# Intel Xeons). Without either, bf16 is emulated: 9x slower than fp32 on an AVX2 EPYC.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_unit(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first of ``BF16_FLAGS`` that this CPU has, or None (no hardware bf16, or no
    /proc/cpuinfo to tell: macOS, Windows)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((flag for flag in BF16_FLAGS if flag in flags), None)
    except OSError:
        pass
    return None


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
