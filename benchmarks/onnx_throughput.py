"""ONNX export parity and CPU throughput: onnxruntime against PyTorch, side by side.

    vit-mqa export RUN_DIR model.onnx
    python benchmarks/onnx_throughput.py RUN_DIR model.onnx --data-dir ../shared/data

Reports the largest logit difference and top-1 agreement over the whole test set, and
inference images/s (median of 5 passes over the test set, batch 256) for both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from vit_mqa.data.datasets import DataConfig, load_data
from vit_mqa.models.vit import load_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("onnx")
    parser.add_argument("--data-dir")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model, config = load_model_dir(args.run_dir)
    data = load_data(DataConfig(**{**config["data"], "data_dir": args.data_dir}))
    pre = model.preprocess
    batches = [pre(data.test.images[i:i + args.batch_size])
               for i in range(0, len(data.test), args.batch_size)]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(args.onnx, opts, providers=["CPUExecutionProvider"])

    def run_torch(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(x).numpy()

    def run_ort(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {"images": x.numpy()})[0]

    ref = np.concatenate([run_torch(x) for x in batches])
    got = np.concatenate([run_ort(x) for x in batches])
    agree = int((ref.argmax(1) == got.argmax(1)).sum())
    labels = data.test.labels.numpy()
    print(f"max |logit difference| {np.abs(ref - got).max():.2e}; top-1 agreement "
          f"{agree}/{len(ref)}; accuracy PyTorch {100 * (ref.argmax(1) == labels).mean():.2f}% "
          f"onnxruntime {100 * (got.argmax(1) == labels).mean():.2f}%")
    for name, fn in (("PyTorch (inference_mode)", run_torch), ("onnxruntime CPU", run_ort)):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for x in batches:
                fn(x)
            times.append(time.perf_counter() - start)
        print(f"{name}: {len(ref) / statistics.median(times):,.0f} images/s "
              f"(batch {args.batch_size}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
