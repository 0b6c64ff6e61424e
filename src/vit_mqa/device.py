"""Which device a process runs on, and what its CPU can do."""

from __future__ import annotations

import os

import torch

from .errors import VitMqaError


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
