"""What a clothing model declines: Fashion-MNIST test images (which it should answer), and
pictures that are no clothing and that it never trained on: MNIST test digits drawn as a
person would (dark pen on paper, enlarged), letters in held-out font families, smooth
colour scenes and drawn objects (none_of_these_styles.py's renderers).

    python benchmarks/fashion_declines.py vit-mqa/fashion-mnist --data-dir ../shared/data \\
        --num 200 --seed 0 --json benchmarks/results/none-of-these/fashion-mnist.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe
from none_of_these_styles import (
    drawn_object,
    held_out_letter_fonts,
    letters_print_clean,
    scene,
    source_rng,
)
from PIL import Image

from vit_mqa.checkpoint import write_json
from vit_mqa.data.datasets import DATASETS, load_idx_dataset
from vit_mqa.evaluation.predict import Predictor


def _png(out: Path, name: str, a: np.ndarray) -> Path:
    path = out / f"{name}.png"
    Image.fromarray(a).save(path)
    return path


def files(out: Path, data_dir: str | None, num: int, seed: int
          ) -> tuple[dict[str, list[Path]], np.ndarray]:
    fashion, _ = load_idx_dataset(DATASETS["fashion-mnist"], data_dir, download=False)
    mnist, _ = load_idx_dataset(DATASETS["mnist"], data_dir, download=False)
    rng = np.random.default_rng(seed)
    found: dict[str, list[Path]] = {"clothing": [], "digits": [], "letters": [], "scenes": [],
                                    "objects": []}
    picks = rng.choice(10000, num, replace=False)
    for n, i in enumerate(picks):
        found["clothing"].append(_png(out, f"c{n}", fashion["test-images"][i]))
        digit = Image.fromarray(255 - mnist["test-images"][i]).resize((112, 112))
        found["digits"].append(_png(out, f"d{n}", np.asarray(digit)))
    fonts = held_out_letter_fonts()
    for n in range(num):
        for source, style, make in (
                ("letters", "letters-print-clean", lambda r: letters_print_clean(fonts, r)),
                ("scenes", "scenes", scene), ("objects", "objects", drawn_object)):
            if source == "letters" and not fonts:
                continue
            data, ext = make(source_rng(seed, style, n))
            path = out / f"{source}{n}{ext}"
            path.write_bytes(data)
            found[source].append(path)
    return found, fashion["test-labels"][picks]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data-dir")
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    predictor = Predictor(args.model)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sources, labels = files(Path(tmp), args.data_dir, args.num, args.seed)
        for source, paths in sources.items():
            results = predictor.predict(paths, top_k=1, errors="record")
            declined = [r.get("decision", "error") != "answer" for r in results]
            row: dict[str, Any] = {"images": len(results), "declined": float(np.mean(declined))}
            if source == "clothing":
                answered = [r["top"][0]["index"] == y for r, y, d in
                            zip(results, labels, declined) if not d]
                row["answered_accuracy"] = float(np.mean(answered)) if answered else None
            rows[source] = row
    print("| source | images | declined | right when answered |\n|---|---:|---:|---:|")
    for source, row in rows.items():
        right = row.get("answered_accuracy")
        print(f"| {source} | {row['images']} | {100 * row['declined']:.1f} % | "
              f"{'' if right is None else f'{100 * right:.1f} %'} |")
    seconds = time.perf_counter() - started
    print(f"{seconds:.0f} s, {describe()}")
    if args.json:
        write_json(args.json, {"model": args.model, "num": args.num, "seed": args.seed,
                               "sources": rows, "seconds": seconds, "machine": describe(),
                               "command": "python benchmarks/fashion_declines.py "
                                          + " ".join(sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
