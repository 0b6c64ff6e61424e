"""Throughput benchmark: vit-mqa beside other ViT implementations, in one run.

    python benchmarks/throughput.py                       # every shape, train and infer
    python benchmarks/throughput.py --shapes mnist-fast --scaling --json-out table.json
    python benchmarks/throughput.py --shapes mnist-fast --impls vit-mqa-mqa --levers

For each model shape, every implementation is built at the same patch size, width,
depth, query heads and MLP width, and timed on the same batches with the same
training step (``steps.training_step``: forward, label-smoothed cross-entropy,
backward, gradient clipping, fused AdamW). Timed windows are taken round-robin
across implementations, so that drift in the machine's speed falls on all of them
alike, and the median window is reported.

Reported per implementation and mode (train / infer): images/s, parameters,
FLOPs per image counted by ``torch.utils.flop_counter.FlopCounterMode``, achieved
GFLOP/s and its fraction of a dense-matmul peak measured in the same run, and the
memory one step needs above what was resident before it. Peers are optional:
vit-pytorch's ``ViT`` and Hugging Face ``ViTForImageClassification`` (SDPA); an
implementation that is not installed is reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vit_mqa.attention import (
    DEFAULT_EXPLICIT_MAX_TOKENS,
    GROUPING_BY_DEVICE,
    GroupedQueryAttention,
)
from vit_mqa.config import AugmentConfig, TrainConfig
from vit_mqa.errors import VitMqaError
from vit_mqa.model import VisionTransformer, ViTConfig, count_parameters
from vit_mqa.optim import make_optimizer
from vit_mqa.preprocess import Preprocess
from vit_mqa.presets import PRESETS
from vit_mqa.steps import compile_model, make_batch, training_step

PEERS = ("vit-pytorch", "hf-vit")


@dataclass(frozen=True)
class Shape:
    """A model shape that every implementation can build."""

    name: str
    image_size: int
    patch_size: int
    in_channels: int
    num_classes: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    train_on_cpu: bool = True  # ViT-S at 224 px is timed for inference only on a CPU

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def kv_variants(self) -> dict[str, int]:
        """MQA, GQA (num_heads / 2, where that is a third distinct choice) and MHA."""
        variants = {"mqa": 1}
        half = self.num_heads // 2
        if self.num_heads % 2 == 0 and half > 1:
            variants["gqa"] = half
        if self.num_heads > 1:
            variants["mha"] = self.num_heads
        return variants


def _preset_shape() -> Shape:
    m = PRESETS["mnist-fast"]["model"]
    return Shape("mnist-fast", 28, m["patch_size"], 1, 10, m["dim"], m["depth"], m["num_heads"],
                 int(m["dim"] * m["mlp_ratio"]))


SHAPES: dict[str, Shape] = {
    "mnist-fast": _preset_shape(),
    # ViT-Ti / ViT-S widths (Touvron et al. 2021).
    "vit-ti-32": Shape("vit-ti-32", 32, 4, 3, 10, 192, 12, 3, 768),
    "vit-s-224": Shape("vit-s-224", 224, 16, 3, 1000, 384, 12, 6, 1536, train_on_cpu=False),
}


# ----- implementations -------------------------------------------------------------


class PeerUnavailable(Exception):
    """A peer implementation is not installed (it is an optional benchmark dependency)."""


class _LogitsOnly(nn.Module):
    """Hugging Face models return an output object; the training step wants logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_vit_mqa(shape: Shape, num_kv_heads: int) -> nn.Module:
    return VisionTransformer(ViTConfig(
        image_size=shape.image_size, patch_size=shape.patch_size, in_channels=shape.in_channels,
        num_classes=shape.num_classes, dim=shape.dim, depth=shape.depth,
        num_heads=shape.num_heads, num_kv_heads=num_kv_heads,
        mlp_ratio=shape.mlp_dim / shape.dim))


def build_vit_pytorch(shape: Shape) -> nn.Module:
    # vit_pytorch/__init__.py imports torchvision (for its other models); its ViT needs
    # only torch and einops, so load that one file.
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable("vit-pytorch is not installed (pip install vit-pytorch)")
    path = f"{list(spec.submodule_search_locations)[0]}/vit.py"
    file_spec = importlib.util.spec_from_file_location("_vit_pytorch_vit", path)
    if file_spec is None or file_spec.loader is None:
        raise PeerUnavailable(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except ImportError as e:
        raise PeerUnavailable(f"vit-pytorch's ViT cannot be imported: {e}") from None
    return module.ViT(image_size=shape.image_size, patch_size=shape.patch_size,
                      num_classes=shape.num_classes, dim=shape.dim, depth=shape.depth,
                      heads=shape.num_heads, mlp_dim=shape.mlp_dim, channels=shape.in_channels,
                      dim_head=shape.dim // shape.num_heads)


def build_hf_vit(shape: Shape) -> nn.Module:
    try:
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTForImageClassification
    except ImportError:
        raise PeerUnavailable("transformers is not installed (pip install transformers)") \
            from None
    config = HFViTConfig(hidden_size=shape.dim, num_hidden_layers=shape.depth,
                         num_attention_heads=shape.num_heads, intermediate_size=shape.mlp_dim,
                         image_size=shape.image_size, patch_size=shape.patch_size,
                         num_channels=shape.in_channels, num_labels=shape.num_classes,
                         attn_implementation="sdpa")
    return _LogitsOnly(ViTForImageClassification(config))


def implementations(shape: Shape) -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """key -> (label, builder), vit-mqa's attention variants first, then the peers."""
    impls: dict[str, tuple[str, Callable[[], nn.Module]]] = {}
    for key, kv in shape.kv_variants().items():
        impls[f"vit-mqa-{key}"] = (f"vit-mqa {key.upper()} (kv={kv})",
                                   lambda kv=kv: build_vit_mqa(shape, kv))
    impls["vit-mqa-mqa+compile"] = ("vit-mqa MQA (kv=1) + torch.compile",
                                    lambda: build_vit_mqa(shape, 1))
    impls["vit-pytorch"] = ("vit-pytorch ViT", lambda: build_vit_pytorch(shape))
    impls["hf-vit"] = ("HF ViTForImageClassification (sdpa)", lambda: build_hf_vit(shape))
    return impls


# ----- measuring --------------------------------------------------------------------


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
def _math_attention() -> Iterator[None]:
    # FlopCounterMode counts the matrix products SDPA's math backend is made of; a fused
    # kernel may be invisible to it on some devices and versions.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step``, counted by FlopCounterMode (matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with _math_attention(), FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


class _MemoryMeter:
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
    runner.step_memory_mib = _MemoryMeter(opts.device).measure(runner.step)
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


def _result(runner: Runner, shape: Shape, opts: BenchOptions,
            peaks: dict[str, float]) -> dict[str, Any]:
    rate = statistics.median(runner.rates)
    gflops = (runner.flops_per_image or 0) * rate / 1e9
    peak = peaks.get(opts.dtype)
    return {
        "shape": shape.name, "tokens": shape.tokens, "impl": runner.key, "label": runner.label,
        "mode": runner.mode, "batch_size": runner.batch_size, "parameters": runner.parameters,
        "images_per_s": rate, "images_per_s_windows": runner.rates,
        "flops_per_image": runner.flops_per_image, "gflops_per_s": gflops,
        "fraction_of_peak": gflops / peak if peak else None,
        "step_memory_mib": runner.step_memory_mib, "compiled": runner.compiled,
        "dtype": opts.dtype,
    }


def bench_shape(shape: Shape, impl_keys: list[str], modes: list[str], batch_sizes: dict[str, int],
                opts: BenchOptions, peaks: dict[str, float],
                say: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Time every implementation of one shape; returns results and skipped entries."""
    available = implementations(shape)
    results, skipped = [], []
    for mode in modes:
        if mode == "train" and opts.device.type == "cpu" and not shape.train_on_cpu:
            skipped.append({"shape": shape.name, "mode": mode, "impl": "*",
                            "reason": "inference only on a CPU"})
            continue
        runners = []
        for key in impl_keys:
            if key not in available:
                if not (key == "vit-mqa-gqa" and shape.num_heads % 2):
                    continue
                skipped.append({"shape": shape.name, "mode": mode, "impl": key,
                                "reason": f"{shape.num_heads} heads have no GQA divisor "
                                          "between 1 and num_heads"})
                continue
            label, build = available[key]
            torch.manual_seed(0)
            try:
                model = build()
            except PeerUnavailable as e:
                skipped.append({"shape": shape.name, "mode": mode, "impl": key,
                                "reason": str(e)})
                continue
            use = dataclasses.replace(opts, compile=True) if key.endswith("+compile") else opts
            runner = make_runner(key, label, model, mode, shape, batch_sizes[mode], use)
            say(f"{shape.name} {mode}: warming up {label}")
            prepare(runner, opts)
            runners.append(runner)
        time_round_robin(runners, opts, lambda m, s=shape.name, mo=mode: say(f"{s} {mo}: {m}"))
        results += [_result(r, shape, opts, peaks) for r in runners]
        del runners
    return results, skipped


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Each row's images/s over the fastest peer's, for the same shape and mode."""
    for row in results:
        peers = [r["images_per_s"] for r in results if r["impl"] in PEERS
                 and r["shape"] == row["shape"] and r["mode"] == row["mode"]
                 and r["batch_size"] == row["batch_size"]]
        row["vs_fastest_peer"] = row["images_per_s"] / max(peers) if peers else None


def pipeline_share(shape: Shape, batch_size: int, opts: BenchOptions,
                   augment: AugmentConfig | None = None) -> dict[str, Any]:
    """Share of a training step spent outside the model: batch gathering from the uint8
    dataset tensor, augmentation, normalisation (``steps.make_batch``, as training runs it)."""
    device = opts.device
    gen = torch.Generator().manual_seed(0)
    n = max(20 * batch_size, 10_000)
    images = torch.randint(0, 256, (n, shape.in_channels, shape.image_size, shape.image_size),
                           dtype=torch.uint8, generator=gen).to(device)
    labels = torch.randint(0, shape.num_classes, (n,), generator=gen).to(device)
    pre = Preprocess((shape.image_size, shape.image_size), shape.in_channels,
                     (0.5,) * shape.in_channels, (0.25,) * shape.in_channels)
    aug = augment or AugmentConfig()
    aug_gen = torch.Generator(device=device).manual_seed(0)
    order = torch.randperm(n, generator=gen).to(device)
    torch.manual_seed(0)
    model = build_vit_mqa(shape, 1).to(device)
    run_model = compile_model(model) if opts.compile else model
    cfg = TrainConfig()
    optimizer = make_optimizer(model, cfg, device)
    steps_per_epoch = n // batch_size
    counter = iter(range(10**9))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        i = next(counter) % steps_per_epoch
        return make_batch(images, labels, order[i * batch_size:(i + 1) * batch_size], pre, aug,
                          aug_gen, model.config.num_classes)

    def full_step() -> Any:
        x, y = batch()
        return training_step(run_model, optimizer, x, y, cfg, opts.autocast)

    windows: dict[str, list[float]] = {"batch": [], "step": []}
    for _ in range(opts.warmup):
        full_step()
    reps = max(5, opts.repeats)
    for _ in range(reps):
        for name, fn, count in (("batch", batch, 20), ("step", full_step, 5)):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(count):
                fn()
            synchronize(device)
            windows[name].append((time.perf_counter() - start) / count)
    t_batch = statistics.median(windows["batch"])
    t_step = statistics.median(windows["step"])
    return {"shape": shape.name, "batch_size": batch_size, "batch_ms": 1e3 * t_batch,
            "step_ms": 1e3 * t_step, "share": t_batch / t_step,
            "augment": dataclasses.asdict(aug)}


def scaling(shape: Shape, batch_sizes: list[int], image_sizes: list[int], modes: list[str],
            opts: BenchOptions, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """vit-mqa MQA and MHA images/s against batch size, and against token count."""
    rows = []
    kvs = {"mqa": 1, "mha": shape.num_heads}
    points = [("batch", b, shape) for b in batch_sizes]
    points += [("tokens", None, dataclasses.replace(shape, image_size=s)) for s in image_sizes]
    for mode in modes:
        for axis, batch, point_shape in points:
            runners = []
            for name, kv in kvs.items():
                torch.manual_seed(0)
                model = build_vit_mqa(point_shape, kv)
                size = batch or _default_batch(point_shape, mode, opts.device)
                runner = make_runner(f"vit-mqa-{name}", name.upper(), model, mode, point_shape,
                                     size, opts)
                prepare(runner, opts)
                runners.append(runner)
            time_round_robin(runners, dataclasses.replace(opts, repeats=max(3, opts.repeats // 2)))
            for r in runners:
                rows.append({"axis": axis, "mode": mode, "attention": r.label,
                             "batch_size": r.batch_size, "image_size": point_shape.image_size,
                             "tokens": point_shape.tokens,
                             "images_per_s": statistics.median(r.rates),
                             "flops_per_image": r.flops_per_image})
            say(f"scaling {mode} {axis}: {rows[-1]['batch_size']} x {rows[-1]['tokens']} tokens")
    return rows


def kv_bytes_per_image(shape: Shape, kv_heads: int, bytes_per_value: int = 4) -> int:
    """Bytes of K and V activations one image's forward pass writes and attention reads:
    every layer, every token, K and V for each K/V head."""
    head_dim = shape.dim // shape.num_heads
    return 2 * shape.depth * shape.tokens * kv_heads * head_dim * bytes_per_value


def kv_scaling(base: Shape, image_sizes: list[int], batch_sizes: list[int], modes: list[str],
               opts: BenchOptions, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Where MQA pays: MQA, GQA (half the heads) and MHA of one shape at several token
    counts and batch sizes. Each point times the three in turn (round robin) and reports
    images/s, FLOPs, the step's memory and the K/V activation bytes per image."""
    variants = {"MQA": 1, "GQA": base.num_heads // 2, "MHA": base.num_heads}
    if base.num_heads % 2 or variants["GQA"] in (1, base.num_heads):
        del variants["GQA"]
    rows = []
    for mode in modes:
        for size in image_sizes:
            shape = dataclasses.replace(base, image_size=size)
            for batch in batch_sizes:
                runners = []
                for name, kv in variants.items():
                    torch.manual_seed(0)
                    runner = make_runner(f"vit-mqa-{name.lower()}", name,
                                         build_vit_mqa(shape, kv), mode, shape, batch, opts)
                    prepare(runner, opts)
                    runners.append((runner, kv))
                time_round_robin([r for r, _ in runners], opts)
                mha = statistics.median(runners[-1][0].rates)
                for runner, kv in runners:
                    rate = statistics.median(runner.rates)
                    rows.append({"mode": mode, "attention": runner.label, "kv_heads": kv,
                                 "image_size": size, "tokens": shape.tokens,
                                 "batch_size": batch, "images_per_s": rate,
                                 "vs_mha": rate / mha,
                                 "flops_per_image": runner.flops_per_image,
                                 "step_memory_mib": runner.step_memory_mib,
                                 "kv_bytes_per_image": kv_bytes_per_image(shape, kv)})
                say(f"kv scaling {mode}: {shape.tokens} tokens, batch {batch}")
    return rows


# ----- levers: each measured against the default path, everything else fixed --------


class _AttentionVariant(nn.Module):
    """Another formulation of the same attention layer, sharing its weights."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn


class _ExpandedKV(_AttentionVariant):
    """Reference formulation that copies each K/V head once per query head (repeat_interleave)
    and runs ordinary multi-head SDPA: what the folded formulation avoids."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        B, N, _ = x.shape
        H, KV, hd = a.num_heads, a.num_kv_heads, a.head_dim
        q, k, v = a.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, N, H, hd).transpose(1, 2)
        k = k.view(B, N, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        v = v.view(B, N, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        out = a.attend(q, k, v)
        return a.proj(out.transpose(1, 2).reshape(B, N, -1))


class _SeparateQKV(_AttentionVariant):
    """Three projections (as Hugging Face's ViT has) instead of one fused matmul; same
    weights, sliced from the fused parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        H, KV, hd = a.num_heads, a.num_kv_heads, a.head_dim
        w, b = a.qkv.weight, a.qkv.bias
        sizes = [H * hd, KV * hd, KV * hd]
        ws, bs = w.split(sizes), (b.split(sizes) if b is not None else (None,) * 3)
        q, k, v = (F.linear(x, wi, bi) for wi, bi in zip(ws, bs))
        B, N, _ = x.shape
        G = H // KV
        q = q.view(B, N, KV, G, hd).permute(0, 2, 1, 3, 4).reshape(B, KV, N * G, hd)
        k = k.view(B, N, KV, hd).transpose(1, 2)
        v = v.view(B, N, KV, hd).transpose(1, 2)
        out = a.attend(q, k, v)
        out = out.view(B, KV, N, G, hd).permute(0, 2, 1, 3, 4).reshape(B, N, -1)
        return a.proj(out)


class _ConvPatchEmbed(nn.Module):
    """The patch embedding as timm and Hugging Face run it: the strided convolution."""

    def __init__(self, proj: nn.Conv2d) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _swap_attention(model: VisionTransformer, wrapper: type[nn.Module]) -> VisionTransformer:
    for block in model.blocks:
        block.attn = wrapper(block.attn)
    return model


LEVERS: dict[str, str] = {
    "compile": "torch.compile",
    "bf16": "bf16 autocast",
    "fused-sdpa": "fused SDPA kernel at every token count",
    "sdpa-math": "SDPA math backend (no fused kernel)",
    "expanded-kv": "K/V copied per query head (repeat_interleave)",
    "native-gqa": "SDPA's enable_gqa instead of folding query groups (fused path)",
    "separate-qkv": "separate Q, K, V projections",
    "conv-patch": "patch embedding as a strided convolution",
    "adamw-foreach": "AdamW foreach instead of fused",
    "adamw-for-loop": "AdamW for-loop instead of fused",
    "no-grad": "inference under no_grad instead of inference_mode",
    "one-thread": "1 intra-op thread",
}


def lever_description(name: str, opts: BenchOptions) -> str:
    """What the changed runner does, given what the default path is on this run."""
    if name == "bf16" and opts.dtype == "bf16":
        return "fp32 instead of bf16 autocast"
    if name == "compile" and opts.compile:
        return "eager instead of torch.compile"
    if name == "native-gqa" and _native_by_default(opts):
        return "query groups folded instead of SDPA's enable_gqa (fused path)"
    return LEVERS[name]


def levers(shape: Shape, modes: list[str], batch_sizes: dict[str, int], opts: BenchOptions,
           say: Callable[[str], None], names: list[str] | None = None) -> list[dict[str, Any]]:
    """vit-mqa MQA's default path against one change at a time."""
    names = names or list(LEVERS)
    rows = []
    for mode in modes:
        if mode == "train" and opts.device.type == "cpu" and not shape.train_on_cpu:
            continue
        for name in names:
            if name == "no-grad" and mode == "train":
                continue
            if name.startswith("adamw") and mode == "infer":
                continue
            if name in ("one-thread", "fused-sdpa") and opts.device.type == "cuda":
                continue  # no intra-op threads to set; the fused kernel is always used there
            if (name == "native-gqa" and opts.device.type != "cuda"
                    and shape.tokens <= DEFAULT_EXPLICIT_MAX_TOKENS):
                continue  # few tokens off CUDA take the explicit products, either way
            variant_opts = opts
            if name == "compile":
                variant_opts = dataclasses.replace(opts, compile=not opts.compile)
            if name == "bf16":
                variant_opts = dataclasses.replace(
                    opts, dtype="fp32" if opts.dtype == "bf16" else "bf16")
            runners = []
            for variant in ("default", name):
                torch.manual_seed(0)
                model = build_vit_mqa(shape, 1)
                kwargs: dict[str, Any] = {}
                use = opts
                if variant != "default":
                    use = variant_opts
                    if name == "expanded-kv":
                        _swap_attention(model, _ExpandedKV)
                    elif name == "separate-qkv":
                        _swap_attention(model, _SeparateQKV)
                    elif name == "fused-sdpa":
                        _fused_attention_everywhere(model)
                    elif name == "native-gqa":
                        _set_grouping(model, "fold" if _native_by_default(opts) else "native")
                    elif name == "conv-patch":
                        model.patch_embed = _ConvPatchEmbed(model.patch_embed.proj)
                    elif name == "adamw-foreach":
                        kwargs["optimizer"] = "foreach"
                    elif name == "adamw-for-loop":
                        kwargs["optimizer"] = "for-loop"
                    elif name == "no-grad":
                        kwargs["inference"] = "no_grad"
                runner = make_runner(variant, LEVERS[name] if variant != "default" else
                                     "default", model, mode, shape, batch_sizes[mode], use,
                                     **kwargs)
                runner.flops_per_image = 0  # not needed here
                runners.append(runner)
            with _lever_context(name, opts, runners):
                for r in runners:
                    prepare(r, opts)
                time_round_robin(runners, opts)
            base, changed = (statistics.median(r.rates) for r in runners)
            rows.append({"shape": shape.name, "mode": mode, "lever": name,
                         "description": lever_description(name, opts),
                         "default_images_per_s": base,
                         "changed_images_per_s": changed, "ratio": changed / base})
            say(f"lever {name} ({mode}): {changed / base:.2f}x")
    return rows


@contextlib.contextmanager
def _lever_context(name: str, opts: BenchOptions, runners: list[Runner]) -> Iterator[None]:
    """Levers that are process settings wrap only the changed runner's step."""
    if name == "sdpa-math":
        _wrap_step(runners[1], _math_attention)
    elif name == "one-thread":
        def one_thread() -> contextlib.AbstractContextManager[None]:
            return _threads(1)
        _wrap_step(runners[1], one_thread)
    yield


def _wrap_step(runner: Runner, context: Callable[[], contextlib.AbstractContextManager]) -> None:
    inner = runner.step

    def step() -> Any:
        with context():
            return inner()
    runner.step = step


def _native_by_default(opts: BenchOptions) -> bool:
    return GROUPING_BY_DEVICE.get(opts.device.type, "fold") == "native"


def _set_grouping(model: nn.Module, grouping: str) -> None:
    for module in model.modules():
        if isinstance(module, GroupedQueryAttention):
            module.grouping = grouping


def _fused_attention_everywhere(model: nn.Module) -> None:
    """Make every attention layer of ``model`` take the fused SDPA kernel at any length."""
    for module in model.modules():
        if isinstance(module, GroupedQueryAttention):
            module.explicit_max_tokens = 0


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----- the whole run, and its report --------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for name in ("transformers", "vit_pytorch"):
        try:
            from importlib.metadata import version

            env[name] = version(name.replace("_", "-"))
        except Exception:
            env[name] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_benchmark(shapes: list[str], impls: list[str], modes: list[str], opts: BenchOptions,
                  train_batch: int | None = None, infer_batch: int | None = None,
                  with_scaling: bool = False, with_levers: bool = False,
                  with_pipeline: bool = True, say: Callable[[str], None] = lambda m: None,
                  lever_names: list[str] | None = None) -> dict[str, Any]:
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise VitMqaError(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    known_impls = {"vit-mqa-mqa", "vit-mqa-gqa", "vit-mqa-mha", "vit-mqa-mqa+compile", *PEERS}
    bad = [i for i in impls if i not in known_impls]
    if bad:
        raise VitMqaError(f"unknown implementation {bad[0]!r}; choose from "
                          f"{', '.join(sorted(known_impls))}")
    bad_levers = [n for n in lever_names or [] if n not in LEVERS]
    if bad_levers:
        raise VitMqaError(f"unknown lever {bad_levers[0]!r}; choose from {', '.join(LEVERS)}")
    bad_modes = [m for m in modes if m not in ("train", "infer")]
    if bad_modes:
        raise VitMqaError(f"unknown mode {bad_modes[0]!r}; choose from train, infer")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    say("measuring the dense-matmul peak (fp32, bf16)")
    peaks = {"fp32": matmul_peak(opts.device, torch.float32),
             "bf16": matmul_peak(opts.device, torch.bfloat16)}
    report: dict[str, Any] = {"environment": environment(opts.device),
                              "options": {"dtype": opts.dtype, "compile": opts.compile,
                                          "repeats": opts.repeats, "min_time": opts.min_time},
                              "matmul_peak_gflops": peaks, "results": [], "skipped": []}
    for name in shapes:
        shape = SHAPES[name]
        batches = {"train": train_batch or _default_batch(shape, "train", opts.device),
                   "infer": infer_batch or _default_batch(shape, "infer", opts.device)}
        results, skipped = bench_shape(shape, impls, modes, batches, opts, peaks, say)
        report["results"] += results
        report["skipped"] += skipped
        if with_pipeline and "train" in modes and (shape.train_on_cpu
                                                    or opts.device.type != "cpu"):
            say(f"{name}: data pipeline share")
            report.setdefault("pipeline", []).append(
                pipeline_share(shape, batches["train"], opts))
        if with_levers:
            report.setdefault("levers", []).extend(
                levers(shape, modes, batches, opts, say, lever_names))
    add_ratios(report["results"])
    if with_scaling:
        base = SHAPES[shapes[0]]
        p = base.patch_size
        sizes = [64, 256, 1024, 4096] if opts.device.type == "cuda" else [16, 32, 64, 128, 256]
        report["scaling"] = scaling(base, sizes,
                                    [p * k for k in (4, 8, 12, 16)], modes, opts, say)
    return report


def _default_batch(shape: Shape, mode: str, device: torch.device) -> int:
    if device.type == "cuda":
        return 256 if shape.image_size >= 224 else 1024
    if shape.image_size >= 224:
        return 16
    return 64 if mode == "train" and shape.name == "mnist-fast" else 128 if mode == "train" \
        else 256


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    env = report["environment"]
    where = env.get("gpu") or env["processor"]
    lines = [f"Device: {env['device']} ({where}); torch {env['torch']}, "
             f"{env['threads']} threads, CPU capability {env['cpu_capability']}; "
             f"dtype {report['options']['dtype']}, compile {report['options']['compile']}."]
    if "matmul_peak_gflops" in report:
        peaks = report["matmul_peak_gflops"]
        lines.append(f"Dense-matmul peak: fp32 {peaks['fp32']:,.0f} GFLOP/s, "
                     f"bf16 {peaks['bf16']:,.0f} GFLOP/s.")
    lines.append("")
    if report.get("results"):
        lines += markdown_table(
            ["shape (tokens)", "mode", "batch", "implementation", "params", "GFLOP/img",
             "images/s", "vs fastest peer", "GFLOP/s", "% of peak", "step memory MiB"],
            [[f"{r['shape']} ({r['tokens']})", r["mode"], str(r["batch_size"]), r["label"],
              f"{r['parameters']:,}", f"{r['flops_per_image'] / 1e9:.3f}",
              f"{r['images_per_s']:,.0f}",
              f"{r['vs_fastest_peer']:.2f}x" if r.get("vs_fastest_peer") else "-",
              f"{r['gflops_per_s']:,.1f}",
              f"{100 * r['fraction_of_peak']:.0f}%" if r["fraction_of_peak"] else "-",
              f"{r['step_memory_mib']:.0f}" if r["step_memory_mib"] is not None else "-"]
             for r in report["results"]])
    for s in report.get("skipped", []):
        lines.append(f"\nSkipped {s['impl']} ({s['shape']}, {s['mode']}): {s['reason']}")
    if report.get("pipeline"):
        lines += [""] + markdown_table(
            ["shape", "batch", "batch prep ms", "whole step ms", "share outside model"],
            [[p["shape"], str(p["batch_size"]), f"{p['batch_ms']:.2f}", f"{p['step_ms']:.2f}",
              f"{100 * p['share']:.1f}%"] for p in report["pipeline"]])
    if report.get("levers"):
        lines += [""] + markdown_table(
            ["shape", "mode", "change from the default path", "default images/s",
             "changed images/s", "ratio"],
            [[v["shape"], v["mode"], v["description"], f"{v['default_images_per_s']:,.0f}",
              f"{v['changed_images_per_s']:,.0f}", f"{v['ratio']:.2f}x"]
             for v in report["levers"]])
    if report.get("kv_scaling"):
        lines += [""] + markdown_table(
            ["mode", "tokens (px)", "batch", "attention", "images/s", "vs MHA", "GFLOP/img",
             "step memory MiB", "K/V activations per image"],
            [[s["mode"], f"{s['tokens']} ({s['image_size']})", str(s["batch_size"]),
              f"{s['attention']} ({s['kv_heads']} K/V)", f"{s['images_per_s']:,.1f}",
              f"{s['vs_mha']:.2f}x", f"{s['flops_per_image'] / 1e9:.2f}",
              "-" if s["step_memory_mib"] is None else f"{s['step_memory_mib']:,.0f}",
              f"{s['kv_bytes_per_image'] / 2**10:,.0f} KiB"] for s in report["kv_scaling"]])
    if report.get("scaling"):
        lines += [""] + markdown_table(
            ["mode", "attention", "batch", "image", "tokens", "images/s"],
            [[s["mode"], s["attention"], str(s["batch_size"]), str(s["image_size"]),
              str(s["tokens"]), f"{s['images_per_s']:,.0f}"] for s in report["scaling"]])
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: str | None, md_path: str | None) -> None:
    from vit_mqa.checkpoint import atomic_write_text

    if json_path:
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    if md_path:
        atomic_write_text(md_path, markdown(report))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive_ints(text: str, flag: str) -> list[int]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values or not all(v.isdigit() and int(v) > 0 for v in values):
        raise VitMqaError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return [int(v) for v in values]


def main(argv: list[str] | None = None) -> int:
    b = argparse.ArgumentParser(description="Training and inference throughput of vit-mqa "
                                "beside vit-pytorch and Hugging Face ViT, at equal shapes.")
    b.add_argument("--shapes", default="mnist-fast,vit-ti-32,vit-s-224",
                   help="comma-separated: mnist-fast, vit-ti-32, vit-s-224")
    b.add_argument("--impls", default="vit-mqa-mqa,vit-mqa-gqa,vit-mqa-mha,vit-mqa-mqa+compile,"
                   "vit-pytorch,hf-vit", help="comma-separated implementations")
    b.add_argument("--modes", default="train,infer", help="train, infer or both")
    b.add_argument("--batch-size", type=int, help="training batch (default per shape/device)")
    b.add_argument("--infer-batch-size", type=int, help="inference batch (default per shape)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    b.add_argument("--dtype", choices=("fp32", "bf16"), help="fp32 or bf16 autocast "
                   "(default bf16 on CUDA, fp32 on CPU)")
    b.add_argument("--compile", action="store_true", help="torch.compile every model (peers "
                   "too); vit-mqa-mqa+compile compiles only that one")
    b.add_argument("--repeats", type=int, default=5, help="timed windows per entry (median)")
    b.add_argument("--min-time", type=float, default=0.5, help="seconds per timed window")
    b.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    b.add_argument("--scaling", action="store_true",
                   help="also images/s against batch size and token count")
    b.add_argument("--levers", nargs="?", const="all", metavar="NAMES",
                   help="also each speed lever (or the comma-separated ones named), measured "
                   "against the default path")
    b.add_argument("--kv-scaling", action="store_true",
                   help="only the MQA / GQA / MHA table of the first shape against token "
                   "count and batch size (where MQA pays)")
    b.add_argument("--kv-image-sizes", default="128,224,384,512",
                   help="image sides for --kv-scaling (default 128,224,384,512: 65 to 1025 "
                   "tokens at patch 16)")
    b.add_argument("--kv-batch-sizes", default="1,16", help="batch sizes for --kv-scaling")
    b.add_argument("--json-out", metavar="FILE", help="write the full report as JSON")
    b.add_argument("--markdown-out", metavar="FILE", help="write the tables to a file too")

    args = b.parse_args(argv)
    from vit_mqa.distributed import pick_device

    try:
        for name in ("repeats", "threads", "batch_size", "infer_batch_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise VitMqaError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.min_time <= 0:
            raise VitMqaError(f"--min-time must be > 0, got {args.min_time}")
        device = pick_device(args.device)
        dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
        opts = BenchOptions(device, dtype, args.compile, args.repeats, args.min_time,
                            threads=args.threads)
        split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
        say = log if sys.stderr.isatty() or os.environ.get("VIT_MQA_VERBOSE") else (
            lambda m: None)
        if args.kv_scaling:
            shape = split(args.shapes)[0]
            if shape not in SHAPES:
                raise VitMqaError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
            if args.threads:
                torch.set_num_threads(args.threads)
            report = {"environment": environment(device),
                      "options": {"dtype": dtype, "compile": args.compile,
                                  "repeats": args.repeats, "min_time": args.min_time},
                      "kv_scaling": kv_scaling(
                          SHAPES[shape], _positive_ints(args.kv_image_sizes, "--kv-image-sizes"),
                          _positive_ints(args.kv_batch_sizes, "--kv-batch-sizes"),
                          split(args.modes), opts, say)}
            write_report(report, args.json_out, args.markdown_out)
            print(markdown(report), end="")
            return 0
        report = run_benchmark(
            split(args.shapes), split(args.impls), split(args.modes), opts,
            train_batch=args.batch_size, infer_batch=args.infer_batch_size,
            with_scaling=args.scaling, with_levers=args.levers is not None,
            lever_names=None if args.levers in (None, "all") else split(args.levers),
            say=log if sys.stderr.isatty() or os.environ.get("VIT_MQA_VERBOSE") else
            (lambda m: None))
    except VitMqaError as e:
        print(f"throughput: error: {e}", file=sys.stderr)
        return 1
    write_report(report, args.json_out, args.markdown_out)
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
