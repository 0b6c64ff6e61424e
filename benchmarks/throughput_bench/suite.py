"""The whole run: the environment, every implementation of each shape timed in turn, the
ratios to the fastest peer, and the optional studies and levers."""

from __future__ import annotations

import dataclasses
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch

from vit_mqa.errors import VitMqaError

from .meters import BenchOptions, Runner, make_runner, matmul_peak, prepare, time_round_robin
from .peers import PEERS, PeerUnavailable, implementations
from .shapes import SHAPES, Shape, default_batch
from .speed_levers import LEVERS, levers
from .studies import pipeline_share, scaling


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
        batches = {"train": train_batch or default_batch(shape, "train", opts.device),
                   "infer": infer_batch or default_batch(shape, "infer", opts.device)}
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
