"""What a benchmark ran on, for its record: the CPU's name and the instruction-set
extensions that change PyTorch's speed, the thread count and the versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

# Extensions that decide which kernels PyTorch's CPU backend runs (bf16 and int8 among them).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
               "amx_int8")


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.split(":", 1)[0].strip() == name), None)


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    flags = (_cpuinfo_field("flags") or "").split()
    return sorted(f for f in flags if f in SPEED_FLAGS)


def describe() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
