"""Accuracy of a run on MNIST test digits drawn, exported and photographed the way people
do (see people_styles.py), before (``--raw``: stretch to 28x28 only) and after the run's
preprocessing procedure. Prints a per-style markdown table; --json writes the record.

    python benchmarks/people_digits.py runs/default --data-dir ../shared/data \\
        --num 500 --seed 0 --json benchmarks/results/people/default.json

The images are generated from the seed and written as files to a temporary folder (or
--keep DIR), then read back through the same code as ``vit-mqa predict``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from people_styles import STYLES, pick_digits, render, style_rng

from vit_mqa.checkpoint import write_json
from vit_mqa.data.datasets import DATASETS, load_idx_dataset
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.predict import Predictor


def write_set(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, styles: list[str],
              seed: int, out: Path) -> dict[str, list[tuple[Path, int]]]:
    """Render every chosen test digit in every style as a file under out/STYLE/."""
    files: dict[str, list[tuple[Path, int]]] = {}
    for style in styles:
        (out / style).mkdir(parents=True, exist_ok=True)
        files[style] = []
        for i in indices:
            data, ext = render(images[i], style, style_rng(seed, style, int(i)))
            path = out / style / f"{int(i):05d}_{int(labels[i])}{ext}"
            path.write_bytes(data)
            files[style].append((path, int(labels[i])))
    return files


def score(predictor: Predictor, files: list[tuple[Path, int]], raw: bool) -> dict[str, Any]:
    """Accuracy over files; an image the procedure calls blank counts as wrong."""
    tensors, labels, blank = [], [], 0
    for path, label in files:
        try:
            tensors.append(predictor.prepare(path, raw=raw))
            labels.append(label)
        except VitMqaError:
            blank += 1
    correct = 0
    if tensors:
        predicted = predictor.probabilities(torch.stack(tensors)).argmax(dim=1)
        correct = int((predicted == torch.tensor(labels)).sum())
    return {"correct": correct, "total": len(files), "no_ink": blank,
            "accuracy": correct / len(files)}


def _epochs_logged(run_dir: Path) -> int:
    """Epochs in the run's metrics log: a run still training is measured mid-way."""
    log = run_dir / "metrics.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--data-dir", help="where mnist/ is (default: vit-mqa's lookup order)")
    ap.add_argument("--num", type=int, default=500, help="MNIST test digits per style")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--styles", default=",".join(STYLES), help="comma-separated")
    ap.add_argument("--procedure", help="override the run's procedure (default: the run's; "
                    "runs saved before procedures were recorded get mnist)")
    ap.add_argument("--keep", metavar="DIR", help="write the images here instead of a "
                    "temporary folder")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args(argv)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not 1 <= args.num <= 10000:
        print(f"people_digits: error: unknown styles {unknown} or --num outside 1..10000",
              file=sys.stderr)
        return 2

    try:
        predictor = Predictor(args.run_dir, procedure=args.procedure)
        if args.procedure is None and predictor.procedure == "stretch":
            predictor.preprocess.procedure = "mnist"
        arrays, _ = load_idx_dataset(DATASETS["mnist"], args.data_dir, download=False)
    except VitMqaError as e:
        print(f"people_digits: error: {e}", file=sys.stderr)
        return 1
    images, labels = arrays["test-images"], arrays["test-labels"]
    indices = pick_digits(args.num, args.seed, len(images))
    torch.set_num_threads(max(1, torch.get_num_threads()))

    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        files = write_set(images, labels, indices, styles, args.seed, out)
        generated = time.perf_counter() - start
        for style in styles:
            rows[style] = {"before": score(predictor, files[style], raw=True),
                           "after": score(predictor, files[style], raw=False)}
    # The dataset's own images, as they are, through both paths: the procedure must not
    # hurt inputs that are already in MNIST's format.
    as_is = [torch.from_numpy(images[i].copy()).unsqueeze(0) for i in indices]
    ok_as_is = []
    for t in as_is:
        try:
            ok_as_is.append(predictor.prepare(t[0].numpy()))
        except VitMqaError:
            ok_as_is.append(torch.zeros_like(t))
    lab = torch.from_numpy(labels[indices].astype(np.int64))
    mnist_row = {
        "before": float((predictor.probabilities(torch.stack(as_is)).argmax(1) == lab)
                        .float().mean()),
        "after": float((predictor.probabilities(torch.stack(ok_as_is)).argmax(1) == lab)
                       .float().mean()),
    }
    # The whole test set as stored: the run's own test accuracy, and how sure it is.
    probs = predictor.probabilities(torch.from_numpy(images.copy()).unsqueeze(1))
    top, predicted = probs.max(dim=1)
    right = predicted == torch.from_numpy(labels.astype(np.int64))
    elapsed = time.perf_counter() - start

    def total(which: str) -> float:
        return (sum(r[which]["correct"] for r in rows.values())
                / sum(r[which]["total"] for r in rows.values()))

    lines = [f"| style | digits | before (`--raw`) | after ({predictor.procedure}) |",
             "|---|---:|---:|---:|"]
    for style, r in rows.items():
        lines.append(f"| {style} | {r['after']['total']} | "
                     f"{100 * r['before']['accuracy']:.1f} % | "
                     f"{100 * r['after']['accuracy']:.1f} % |")
    lines.append(f"| **overall** | {sum(r['after']['total'] for r in rows.values())} | "
                 f"**{100 * total('before'):.1f} %** | **{100 * total('after'):.1f} %** |")
    lines.append(f"| MNIST test digits as stored | {len(indices)} | "
                 f"{100 * mnist_row['before']:.1f} % | {100 * mnist_row['after']:.1f} % |")
    print("\n".join(lines))
    print(f"\nMNIST test accuracy (10000, as stored): {100 * float(right.float().mean()):.2f} %;"
          f" mean top probability when right: {100 * float(top[right].mean()):.1f} %")
    print(f"{elapsed:.0f} s in all ({generated:.0f} s generating), "
          f"{torch.get_num_threads()} threads")
    if args.json:
        write_json(args.json, {
            "run_dir": str(args.run_dir), "procedure": predictor.procedure,
            "num_per_style": args.num, "seed": args.seed, "styles": rows,
            "overall": {"before": total("before"), "after": total("after")},
            "mnist_as_stored_subset": mnist_row,
            "mnist_test_accuracy": float(right.float().mean()),
            "mnist_test_mean_top_probability_when_correct": float(top[right].mean()),
            "run_finished": (Path(args.run_dir) / "results.json").exists(),
            "run_epochs_logged": _epochs_logged(Path(args.run_dir)),
            "seconds": elapsed, "command": "python " + " ".join(sys.argv),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "threads": torch.get_num_threads()},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
