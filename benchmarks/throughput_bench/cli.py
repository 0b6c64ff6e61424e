"""The command line of ``benchmarks/throughput.py``."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from vit_mqa.errors import VitMqaError

from .meters import BenchOptions
from .shapes import SHAPES
from .studies import kv_scaling
from .suite import environment, run_benchmark
from .tables import markdown, write_report


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
    from vit_mqa.device import pick_device

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
