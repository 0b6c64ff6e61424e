"""Measuring: the dense-matmul peak, FLOPs counted by ``FlopCounterMode``, the memory one
step needs, and the timed steps (``Runner``), taken round-robin across implementations."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vit_mqa.config.sections import TrainConfig
from vit_mqa.models.vit import VisionTransformer, count_parameters
from vit_mqa.training.optim import make_optimizer
from vit_mqa.training.steps import compile_model, training_step

from .shapes import Shape


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.5,
                max_n: int | None = None) -> float:
    """Dense square-matmul GFLOP/s: the best of several products, sized to run ``seconds``.

    The size is found from a small product first, so that a precision the processor
    only emulates (bf16 without native support) still finishes quickly.
    """
    max_n = max_n or (8192 if device.type == "cuda" else 4096)
    n, rate = 256, 0.0
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up (kernel selection, page faults)
        synchronize(device)
        reps = 3 if device.type == "cuda" else 1
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            synchronize(device)
            best = min(best, (time.perf_counter() - start) / reps)
        rate = max(rate, 2 * n**3 / best / 1e9)
        grow = n * 2 <= max_n and best * 8 < seconds
        if not grow:
            return rate
        n *= 2


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    # FlopCounterMode counts the matrix products SDPA's math backend is made of; a fused
    # kernel may be invisible to it on some devices and versions.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step``, counted by FlopCounterMode (matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with math_attention(), FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


class MemoryMeter:
    """Memory one step needs above what was resident before it (activations, gradients'
    temporaries, workspace). CUDA: the allocator's peak. CPU (Linux, glibc): the resident-set
    high-water mark, reset through /proc/self/clear_refs, with glibc told to map every
    allocation of 64 KiB or more separately for that one step, so that freed tensors leave
    the resident set at once. None where either is unavailable."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(key)

    def measure(self, step: Callable[[], Any]) -> float | None:
        if self.device.type == "cuda":
            synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            step()
            synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (Linux >= 4.0)
            before = self._status("VmRSS")
            step()
            peak = self._status("VmHWM")
        except (OSError, AttributeError):
            return None
        finally:
            with contextlib.suppress(Exception):
                # Back to large-block reuse, as glibc settles on by itself (its ceiling).
                libc.mallopt(self.M_MMAP_THRESHOLD, 32 * 2**20)
                libc.mallopt(self.M_TRIM_THRESHOLD, 64 * 2**20)
        return max(peak - before, 0) / 2**20


@dataclass
class Runner:
    """One (implementation, mode) to time: a model, its inputs, and a step function."""

    key: str
    label: str
    mode: str  # "train" or "infer"
    shape: Shape
    model: nn.Module
    batch_size: int
    step: Callable[[], Any]
    parameters: int
    steps_per_window: int = 1
    rates: list[float] = field(default_factory=list)
    flops_per_image: int | None = None
    step_memory_mib: float | None = None
    compiled: bool = False


@dataclass
class BenchOptions:
    device: torch.device
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    compile: bool = False
    repeats: int = 5
    min_time: float = 0.5  # seconds per timed window
    warmup: int = 3
    threads: int | None = None

    @property
    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.dtype == "bf16")


def make_runner(key: str, label: str, model: nn.Module, mode: str, shape: Shape,
                batch_size: int, opts: BenchOptions, seed: int = 0,
                optimizer: str = "fused", inference: str = "inference_mode") -> Runner:
    """Build the timed step. ``optimizer`` ("fused", "foreach", "for-loop") and
    ``inference`` ("inference_mode", "no_grad", "grad") exist for the levers table."""
    device = opts.device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, shape.in_channels, shape.image_size, shape.image_size,
                    generator=gen).to(device)
    y = torch.randint(0, shape.num_classes, (batch_size,), generator=gen).to(device)
    params = count_parameters(model)
    model = model.to(device)
    run_model = compile_model(model) if opts.compile else model
    cfg = TrainConfig()
    autocast = opts.autocast
    if mode == "train":
        model.train()
        optim = _optimizer(model, cfg, device, optimizer)

        def step() -> Any:
            return training_step(run_model, optim, x, y, cfg, autocast)
    else:
        model.eval()
        context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
                   "grad": contextlib.nullcontext}[inference]

        def step() -> Any:
            with context(), autocast:
                return run_model(x)
    return Runner(key, label, mode, shape, model, batch_size, step, params, compiled=opts.compile)


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
               kind: str) -> torch.optim.Optimizer:
    if kind == "fused" and isinstance(model, VisionTransformer):
        return make_optimizer(model, cfg, device)  # exactly what `vit-mqa train` uses
    options = {"fused": {"fused": True}, "foreach": {"foreach": True},
               "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             **options)


def prepare(runner: Runner, opts: BenchOptions) -> None:
    """Warm up, count FLOPs, measure memory, and size the timed window."""
    for _ in range(opts.warmup):
        runner.step()
    synchronize(opts.device)
    if runner.flops_per_image is None:
        # Counted on the eager model: a compiled graph hides its operations from the counter.
        eager = runner.model
        flops_runner = make_runner(runner.key, runner.label, eager, runner.mode,
                                   runner.shape, runner.batch_size,
                                   dataclasses.replace(opts, compile=False))
        runner.flops_per_image = count_flops(flops_runner.step) // runner.batch_size
        if runner.mode == "infer":
            runner.model.eval()
        else:
            runner.model.train()
    runner.step_memory_mib = MemoryMeter(opts.device).measure(runner.step)
    start = time.perf_counter()
    runner.step()
    synchronize(opts.device)
    one = time.perf_counter() - start
    runner.steps_per_window = max(1, math.ceil(opts.min_time / max(one, 1e-6)))


def time_round_robin(runners: list[Runner], opts: BenchOptions,
                     progress: Callable[[str], None] | None = None) -> None:
    """``opts.repeats`` timed windows per runner, taken in turn across runners."""
    for r in range(opts.repeats):
        for runner in runners:
            synchronize(opts.device)
            start = time.perf_counter()
            for _ in range(runner.steps_per_window):
                runner.step()
            synchronize(opts.device)
            elapsed = time.perf_counter() - start
            runner.rates.append(runner.steps_per_window * runner.batch_size / elapsed)
        if progress:
            progress(f"repeat {r + 1}/{opts.repeats}")
