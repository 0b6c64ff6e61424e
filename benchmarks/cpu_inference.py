"""CPU inference of a trained run: int8 against fp32, and the latency of one image.

    python benchmarks/cpu_inference.py RUN_DIR --data-dir ../shared/data \\
        --json-out benchmarks/results/cpu/inference.json

Table 1, on the run's whole test set: test accuracy, file size, and images/s at batch 1
and at batch 256, for PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8 (the
Linear layers' weights in int8, activations quantised per batch at run time:
``vit-mqa export --int8``).

Table 2, one image at a time (p50 and p95 over many calls): ``Predictor.predict`` on a
PNG file (decoding and the run's preprocessing included) for the three paths, the
demo's request (``DemoModel.analyse``: prediction and attention rollout), and whole
processes from start to answer: ``vit-mqa --help`` and ``vit-mqa predict RUN one.png``
(imports, model load and the first call's warm-up counted). Run it alone on the
machine: every figure is a time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import cpu_flags, cpu_name
from PIL import Image

from vit_mqa.apps.demo import DemoModel
from vit_mqa.config.recipe import data_config_from_dict
from vit_mqa.data.datasets import load_data
from vit_mqa.evaluation.predict import Predictor
from vit_mqa.models.interop import export_onnx
from vit_mqa.models.vit import load_model_dir


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p95_ms": 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
            "calls": len(ordered)}


def timed(call: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data-dir")
    parser.add_argument("--single", type=int, default=1000,
                        help="test images for the batch-1 throughput (default 1000)")
    parser.add_argument("--calls", type=int, default=200, help="calls per latency figure")
    parser.add_argument("--processes", type=int, default=10, help="runs per process figure")
    parser.add_argument("--json-out", metavar="FILE")
    args = parser.parse_args()

    _, config = load_model_dir(args.run_dir)
    data_cfg = data_config_from_dict(config["data"], args.run_dir)
    if args.data_dir:
        data_cfg.data_dir = args.data_dir
    test = load_data(data_cfg).test
    work = Path(tempfile.mkdtemp(prefix="cpu-inference-"))
    files = {"fp32": work / "fp32.onnx", "int8": work / "int8.onnx"}
    export_onnx(load_model_dir(args.run_dir)[0], files["fp32"], verify=True)
    export_onnx(load_model_dir(args.run_dir)[0], files["int8"], verify=True, int8=True)
    paths = {"PyTorch fp32": None, "ONNX Runtime fp32": files["fp32"],
             "ONNX Runtime int8": files["int8"]}
    sizes = {"PyTorch fp32": (Path(args.run_dir) / "model.safetensors").stat().st_size,
             "ONNX Runtime fp32": files["fp32"].stat().st_size,
             "ONNX Runtime int8": files["int8"].stat().st_size}

    rows = []
    for name, onnx in paths.items():
        wide = Predictor(args.run_dir, batch_size=256, onnx=onnx)
        probs = wide.probabilities(test.images)
        accuracy = (probs.argmax(1) == test.labels).float().mean().item()
        batch256 = statistics.median(timed(lambda w=wide: w.probabilities(test.images), 3))
        single = Predictor(args.run_dir, batch_size=1, onnx=onnx)
        few = test.images[:args.single]
        single.probabilities(few[:10])  # warm-up
        batch1 = statistics.median(timed(lambda s=single, x=few: s.probabilities(x), 3))
        rows.append({"path": name, "file_bytes": sizes[name], "test_accuracy": accuracy,
                     "images_per_s_batch1": len(few) / batch1,
                     "images_per_s_batch256": len(test) / batch256})
        print(f"{name}: {100 * accuracy:.2f} %", file=sys.stderr)

    # One photo-like PNG: a test digit, dark on light, 4x larger, as people's files are.
    png = work / "one.png"
    Image.fromarray(255 - test.images[0, 0].numpy()).resize((112, 112)).save(png)
    latency = []
    for name, onnx in paths.items():
        predictor = Predictor(args.run_dir, onnx=onnx)
        predictor.predict([png])  # warm-up
        latency.append({"path": f"Predictor.predict, one PNG ({name})",
                        **percentiles(timed(lambda p=predictor: p.predict([png]), args.calls))})
    demo = DemoModel(args.run_dir)
    picture = Image.open(png).convert("RGB")
    demo.analyse(picture)
    latency.append({"path": "demo request (prediction + attention rollout)",
                    **percentiles(timed(lambda: demo.analyse(picture), args.calls))})
    for label, argv in (("process: vit-mqa --help", ["--help"]),
                        ("process: vit-mqa predict RUN one.png", ["predict", args.run_dir,
                                                                   str(png)])):
        runs = timed(lambda a=argv: subprocess.run([sys.executable, "-m", "vit_mqa", *a],
                                            check=True, capture_output=True),
                     args.processes)
        latency.append({"path": label, **percentiles(runs)})

    report = {"run_dir": str(args.run_dir), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "onnxruntime": __import__("onnxruntime").__version__,
              "python": platform.python_version(), "test_images": len(test),
              "throughput": rows, "latency": latency}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    base = rows[0]
    print(f"CPU: {report['cpu']} ({', '.join(report['cpu_flags'])}), {report['threads']} "
          f"threads; torch {report['torch']}, onnxruntime {report['onnxruntime']}\n")
    print("| path | file | test accuracy | batch 1 images/s | batch 256 images/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['file_bytes'] / 1024:,.0f} KiB | "
              f"{100 * r['test_accuracy']:.2f} % | {r['images_per_s_batch1']:,.0f} "
              f"({r['images_per_s_batch1'] / base['images_per_s_batch1']:.2f}x) | "
              f"{r['images_per_s_batch256']:,.0f} "
              f"({r['images_per_s_batch256'] / base['images_per_s_batch256']:.2f}x) |")
    print("\n| one image | p50 ms | p95 ms | calls |")
    print("|---|---:|---:|---:|")
    for r in latency:
        print(f"| {r['path']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['calls']} |")
    for f in files.values():
        f.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
