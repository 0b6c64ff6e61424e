"""Accuracy of a run on digits that no one here drew (see real_styles.py): MNIST test
digits scanned small, cropped tight, faint, blurred or re-drawn with other pens, and
printed digits in the font families held out of training. Prints a per-style markdown
table; --json writes the record.

    python benchmarks/real_digits.py runs/default --data-dir ../shared/data \\
        --num 300 --seed 0 --json benchmarks/results/real/default.json

An image the procedure refuses ("no ink found") counts as wrong. "unsure" is the share
of images whose calibrated top probability is under the run's threshold (what
`vit-mqa predict` flags), and "sure, right" the accuracy on the others.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import describe
from real_styles import (
    HANDWRITTEN,
    PRINTED,
    PRINTED_RENDERERS,
    STYLES,
    held_out_fonts,
    render_handwritten,
    style_rng,
)

from vit_mqa.checkpoint import write_json
from vit_mqa.data.datasets import DATASETS, load_idx_dataset
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.predict import Predictor


def write_style(style: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                fonts: list[Path], seed: int, out: Path) -> list[tuple[Path, int]]:
    """Every image of one style as a file under out/STYLE/; (path, label) pairs."""
    (out / style).mkdir(parents=True, exist_ok=True)
    files = []
    if style in HANDWRITTEN:
        for i in indices:
            data, ext = render_handwritten(images[i], style, style_rng(seed, style, int(i)))
            files.append((out / style / f"{int(i):05d}_{int(labels[i])}{ext}", int(labels[i])))
            files[-1][0].write_bytes(data)
    else:
        for n, font in enumerate(fonts):
            for digit in range(10):
                rng = style_rng(seed, style, 10 * n + digit)
                data, ext = PRINTED_RENDERERS[style](font, digit, rng)
                files.append((out / style / f"{font.stem}_{digit}{ext}", digit))
                files[-1][0].write_bytes(data)
    return files


def score(predictor: Predictor, files: list[tuple[Path, int]]) -> dict[str, Any]:
    """Accuracy over files (a refused image is wrong), and how the confidence splits."""
    tensors, labels, refused = [], [], 0
    for path, label in files:
        try:
            tensors.append(predictor.prepare(path))
            labels.append(label)
        except VitMqaError:
            refused += 1
    correct = sure = sure_correct = 0
    if tensors:
        probs = predictor.probabilities(torch.stack(tensors))
        top, predicted = probs.max(dim=1)
        right = predicted == torch.tensor(labels)
        confident = top >= predictor.min_confidence
        correct, sure = int(right.sum()), int(confident.sum())
        sure_correct = int((right & confident).sum())
    return {"correct": correct, "total": len(files), "refused": refused,
            "accuracy": correct / len(files), "unsure": (len(tensors) - sure) / len(files),
            "sure_accuracy": sure_correct / sure if sure else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--data-dir", help="where mnist/ is (default: vit-mqa's lookup order)")
    ap.add_argument("--num", type=int, default=300, help="MNIST test digits per handwritten "
                    "style (printed styles take every held-out font's ten digits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--styles", default=",".join(STYLES), help="comma-separated")
    ap.add_argument("--keep", metavar="DIR", help="write the images here instead of a "
                    "temporary folder")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args(argv)
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not 1 <= args.num <= 10000:
        print(f"real_digits: error: unknown styles {unknown} or --num outside 1..10000",
              file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.run_dir)
        arrays, _ = load_idx_dataset(DATASETS["mnist"], args.data_dir, download=False)
    except VitMqaError as e:
        print(f"real_digits: error: {e}", file=sys.stderr)
        return 1
    fonts = held_out_fonts() if any(s in PRINTED for s in styles) else []
    if any(s in PRINTED for s in styles) and not fonts:
        print("real_digits: no FreeFont or Noto fonts installed: printed styles skipped "
              "(Debian: apt install fonts-freefont-ttf fonts-noto-core)", file=sys.stderr)
        styles = [s for s in styles if s not in PRINTED]
    images, labels = arrays["test-images"], arrays["test-labels"]
    indices = np.sort(np.random.default_rng([args.seed, 4242]).choice(
        len(images), size=args.num, replace=False))

    start = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp)
        for style in styles:
            files = write_style(style, images, labels, indices, fonts, args.seed, out)
            rows[style] = score(predictor, files)
    elapsed = time.perf_counter() - start

    def overall(names: list[str]) -> float | None:
        chosen = [rows[s] for s in names if s in rows]
        total = sum(r["total"] for r in chosen)
        return sum(r["correct"] for r in chosen) / total if total else None

    lines = ["| style | images | read correctly | refused | unsure | right when sure |",
             "|---|---:|---:|---:|---:|---:|"]
    for style, r in rows.items():
        sure = "n/a" if r["sure_accuracy"] is None else f"{100 * r['sure_accuracy']:.1f} %"
        lines.append(f"| {style} | {r['total']} | {100 * r['accuracy']:.1f} % | "
                     f"{r['refused']} | {100 * r['unsure']:.1f} % | {sure} |")
    summary = {"handwritten": overall(list(HANDWRITTEN)), "printed": overall(list(PRINTED)),
               "all": overall(list(rows))}
    for name, value in summary.items():
        if value is not None:
            lines.append(f"| **{name}** | | **{100 * value:.1f} %** | | | |")
    print("\n".join(lines))
    print(f"\n{len(fonts)} held-out fonts; unsure = top probability under "
          f"{predictor.min_confidence:.2f}; {elapsed:.0f} s, {describe()['cpu']}, "
          f"{torch.get_num_threads()} threads")
    if args.json:
        write_json(args.json, {
            "run_dir": str(args.run_dir), "num_per_style": args.num, "seed": args.seed,
            "fonts": [f.name for f in fonts], "styles": rows, "overall": summary,
            "min_confidence": predictor.min_confidence, "seconds": elapsed,
            "command": "python " + " ".join(sys.argv), "machine": describe(),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
