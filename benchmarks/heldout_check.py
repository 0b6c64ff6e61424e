"""The held-out check: digits from outside this project, never used to train or tune.

Handwriting from a public corpus other than MNIST, the UCI optical digits that
scikit-learn ships (43 writers, scanned at 32x32 and reduced to 8x8 counts of 0-16): 900
of them sampled with a fixed seed, enlarged to 64x64 (bicubic), blurred (Gaussian, sigma
1.5) and stretched to 0-255, as dark ink on light and as light on dark; and the digits
0-9 in every installed font that draws them (training's DejaVu and Liberation included),
black on white, tilted, 60-200 px tall, clean and as a phone photo (real_styles.py's
print-clean and print-photo renderers). A refused image counts as wrong.

    pip install scikit-learn        # evaluation only; not a dependency of vit-mqa
    python benchmarks/heldout_check.py vit-mqa/mnist --json benchmarks/results/real/heldout.json
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import describe
from PIL import Image, ImageFilter
from real_styles import print_clean, print_photo, style_rng

from vit_mqa.checkpoint import write_json
from vit_mqa.data.printed import font_files, render_digits
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.predict import Predictor

UCI_STYLES = ("uci-dark-on-light", "uci-light-on-dark")
# Style -> (renderer, the real_styles style whose random draws it shares).
FONT_STYLES = {"font-clean": (print_clean, "print-clean"),
               "font-photo": (print_photo, "print-photo")}


def uci_files(out: Path, count: int, seed: int) -> dict[str, list[tuple[Path, int]]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    chosen = np.random.default_rng(seed).choice(len(digits.images), count, replace=False)
    files: dict[str, list[tuple[Path, int]]] = {s: [] for s in UCI_STYLES}
    for i in chosen:
        small = Image.fromarray((digits.images[i] / 16 * 255).astype(np.uint8))
        big = small.resize((64, 64), Image.Resampling.BICUBIC)
        a = np.asarray(big.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
        a = (a - a.min()) / max(a.max() - a.min(), 1) * 255
        for style, image in zip(UCI_STYLES, (255 - a, a)):
            path = out / style / f"{int(i):04d}_{int(digits.target[i])}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.astype(np.uint8)).save(path)
            files[style].append((path, int(digits.target[i])))
    return files


def font_files_by_style(out: Path, seed: int) -> dict[str, list[tuple[Path, int]]]:
    fonts = [f for f in font_files([""]) if render_digits(f, 32) is not None]
    files: dict[str, list[tuple[Path, int]]] = {}
    for style, (render, drawn_as) in FONT_STYLES.items():
        (out / style).mkdir(parents=True, exist_ok=True)
        files[style] = []
        for n, font in enumerate(fonts):
            for digit in range(10):
                data, ext = render(font, digit, style_rng(seed, drawn_as, 10 * n + digit))
                path = out / style / f"{font.stem}_{digit}{ext}"
                path.write_bytes(data)
                files[style].append((path, digit))
    return files


def score(predictor: Predictor, files: list[tuple[Path, int]]) -> dict[str, Any]:
    tensors, labels, refused = [], [], 0
    for path, label in files:
        try:
            tensors.append(predictor.prepare(path))
            labels.append(label)
        except VitMqaError:
            refused += 1
    correct, confusions = 0, collections.Counter()
    if tensors:
        predicted = predictor.probabilities(torch.stack(tensors)).argmax(dim=1).tolist()
        correct = sum(p == t for p, t in zip(predicted, labels))
        confusions.update(f"{t}->{p}" for p, t in zip(predicted, labels) if p != t)
    return {"correct": correct, "total": len(files), "refused": refused,
            "accuracy": correct / len(files) if files else None,
            "confusions": dict(confusions.most_common(6))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="run directory or built-in model name")
    ap.add_argument("--num", type=int, default=900, help="UCI digits (of 1,797)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    try:
        predictor = Predictor(args.model)
    except VitMqaError as e:
        print(f"heldout_check: error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        try:
            files.update(uci_files(Path(tmp), args.num, args.seed))
        except ImportError:
            print("heldout_check: scikit-learn is not installed: UCI styles skipped",
                  file=sys.stderr)
        files.update(font_files_by_style(Path(tmp), args.seed))
        rows = {style: score(predictor, f) for style, f in files.items()}
    elapsed = time.perf_counter() - start
    total = sum(r["total"] for r in rows.values())
    overall = sum(r["correct"] for r in rows.values()) / total
    print("| style | images | read correctly | refused | top confusions (true->read) |")
    print("|---|---:|---:|---:|---|")
    for style, r in rows.items():
        top = ", ".join(f"{k} {v}" for k, v in list(r["confusions"].items())[:4])
        print(f"| {style} | {r['total']} | {100 * r['accuracy']:.1f} % | {r['refused']} | "
              f"{top} |")
    print(f"| **all** | {total} | **{100 * overall:.1f} %** | | |")
    print(f"\n{elapsed:.0f} s, {describe()['cpu']}")
    if args.json:
        write_json(args.json, {"model": args.model, "styles": rows, "overall": overall,
                               "num_uci": args.num, "seed": args.seed, "seconds": elapsed,
                               "command": "python " + " ".join(sys.argv),
                               "machine": describe()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
