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

The code is the package beside this file, ``throughput_bench/`` (one module per concern:
shapes, peers, meters, studies, speed levers, the whole run, tables, command line); this
file is its entry point.
"""

from __future__ import annotations

import sys

from throughput_bench import main

if __name__ == "__main__":
    sys.exit(main())
