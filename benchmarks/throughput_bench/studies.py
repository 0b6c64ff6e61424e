"""Studies beside the main table: the data pipeline's share of a training step, and
images/s of MQA, GQA and MHA against batch size and token count (where MQA pays)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from vit_mqa.config.sections import AugmentConfig, TrainConfig
from vit_mqa.data.preprocess import Preprocess
from vit_mqa.training.optim import make_optimizer
from vit_mqa.training.steps import compile_model, make_batch, training_step

from .meters import BenchOptions, make_runner, prepare, synchronize, time_round_robin
from .peers import build_vit_mqa
from .shapes import Shape, default_batch


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
                size = batch or default_batch(point_shape, mode, opts.device)
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
