"""Knowing when not to answer: how well a digit model declines pictures that are not
digits (letters, clothing, scenes, drawn objects: none_of_these_styles.py), and how much
it still answers on real digits (real_styles.py). Prints markdown tables; --json writes
the record.

    python benchmarks/none_of_these.py vit-mqa/mnist --data-dir ../shared/data \\
        --num 200 --seed 0 --json benchmarks/results/none-of-these/mnist.json

Each image goes through `Predictor.predict(..., errors="record")`, as `vit-mqa predict`
runs it. "declined": the result's "decision" is not "answer" (where predict gives a
decision), else it is "unsure"; an image refused as blank ("no ink found") counts as
declined, for digits and not-digits alike. The scores (higher = less like a digit) are
the max softmax probability at the run's temperature T, negated (MSP, Hendrycks &
Gimpel 2017), and the energy -T logsumexp(logits / T) (Liu et al. 2020): the result's
"energy" where predict gives one, else computed here from the logits; a refused image
scores +inf. AUROC and FPR95 take the real digits (every digit style pooled) as the
in-distribution set and the not-digits as the positive class: FPR95 is the share of real
digits flagged at the threshold that flags 95 % of the not-digits. The record also holds
the other convention of the literature (in-distribution positive): the share of
not-digits let through at the threshold that keeps 95 % of the digits.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import describe
from none_of_these_styles import (
    CLOTHING_SOURCES,
    LETTER_SOURCES,
    NOT_DIGITS,
    held_out_letter_fonts,
    render_not_digit,
)
from real_styles import (
    HANDWRITTEN,
    PRINTED,
    PRINTED_RENDERERS,
    held_out_fonts,
    render_handwritten,
    style_rng,
)
from tqdm import tqdm

from vit_mqa.checkpoint import write_json
from vit_mqa.data.datasets import DATASETS, load_idx_dataset
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.predict import Predictor

DIGIT_STYLES = HANDWRITTEN + PRINTED
SCORES = ("msp", "energy")

# ---------------------------------------------------------------- metrics


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores where higher means positive: the chance that a
    random positive outscores a random negative, ties counting one half (ranks)."""
    scores = np.concatenate([positive, negative]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, ties averaged
    n_pos, n_neg = len(positive), len(negative)
    rank_sum = float(mean_rank[inverse][:n_pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def fpr_at_tpr(positive: np.ndarray, negative: np.ndarray, tpr: float = 0.95) -> float:
    """Share of negatives flagged (score >= t) at the highest threshold t that flags at
    least ``tpr`` of the positives."""
    k = max(1, math.ceil(tpr * len(positive) - 1e-9))
    threshold = np.sort(positive)[::-1][k - 1]
    return float(np.mean(negative >= threshold))


def separation(positive: np.ndarray, negative: np.ndarray) -> dict[str, float]:
    """AUROC, FPR95 (positives = not digits), and not-digits let through when 95 % of
    the digits are kept (in-distribution positive)."""
    return {"auroc": auroc(positive, negative), "fpr95": fpr_at_tpr(positive, negative),
            "accepted_at_95_kept": fpr_at_tpr(-negative, -positive)}


# ---------------------------------------------------------------- images


def write(out: Path, name: str, data: bytes, ext: str) -> Path:
    path = out / f"{name}{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def digit_files(style: str, digits: tuple[np.ndarray, np.ndarray], fonts: list[Path],
                num: int, seed: int, out: Path) -> list[tuple[Path, int]]:
    """``num`` images of one real_styles style as files; (path, label) pairs. Printed
    styles draw ``num`` (font, digit) pairs of the held-out fonts with a fixed seed."""
    images, labels = digits
    if style in HANDWRITTEN:
        chosen = np.sort(np.random.default_rng([seed, 4242]).choice(
            len(images), size=min(num, len(images)), replace=False))
        return [(write(out, f"{style}/{int(i):05d}_{int(labels[i])}", *render_handwritten(
            images[i], style, style_rng(seed, style, int(i)))), int(labels[i]))
            for i in chosen]
    pairs = np.sort(np.random.default_rng([seed, 4243]).choice(
        10 * len(fonts), size=min(num, 10 * len(fonts)), replace=False))
    return [(write(out, f"{style}/{fonts[p // 10].stem}_{p % 10}", *PRINTED_RENDERERS[style](
        fonts[p // 10], int(p % 10), style_rng(seed, style, int(p)))), int(p % 10))
        for p in pairs]


def not_digit_files(source: str, fonts: tuple[Path, ...], clothing: np.ndarray | None,
                    num: int, seed: int, out: Path) -> list[tuple[Path, int]]:
    """``num`` images of one none_of_these_styles source; (path, -1) pairs."""
    return [(write(out, f"{source}/{i:05d}", *render_not_digit(source, i, seed, fonts,
                                                               clothing)), -1)
            for i in range(num)]


# ---------------------------------------------------------------- scoring


def energies(predictor: Predictor, paths: list[Path]) -> np.ndarray:
    """-T logsumexp(logits / T) of each image, from the network's logits."""
    if not paths:
        return np.empty(0)
    t = predictor.temperature
    predictor.model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), predictor.batch_size):
            batch = torch.stack([predictor.prepare(p) for p in
                                 paths[start:start + predictor.batch_size]])
            logits = predictor.model(predictor.preprocess(batch)).float()
            out.append((-t * torch.logsumexp(logits / t, dim=-1)).numpy())
    return np.concatenate(out).astype(np.float64)


def declined(result: dict[str, Any]) -> bool:
    if "error" in result:
        return True
    return result["decision"] != "answer" if "decision" in result else bool(result["unsure"])


def score(predictor: Predictor, files: list[tuple[Path, int]]) -> dict[str, np.ndarray]:
    """Per image: refused, declined, decided "unknown", predicted class (-1 when
    refused), label, and the scores (higher = less like a digit; +inf when refused)."""
    results = predictor.predict([str(p) for p, _ in files], top_k=1, errors="record")
    ok = [i for i, r in enumerate(results) if "error" not in r]
    msp = np.full(len(files), np.inf)
    energy = np.full(len(files), np.inf)
    msp[ok] = [-results[i]["top"][0]["probability"] for i in ok]
    if all("energy" in results[i] for i in ok):
        energy[ok] = [results[i]["energy"] for i in ok]
    else:
        energy[ok] = energies(predictor, [files[i][0] for i in ok])
    return {"refused": np.array(["error" in r for r in results], dtype=bool),
            "declined": np.array([declined(r) for r in results], dtype=bool),
            "unknown": np.array([r.get("decision") == "unknown" for r in results], dtype=bool),
            "predicted": np.array([r["top"][0]["index"] if "top" in r else -1
                                   for r in results]),
            "label": np.array([label for _, label in files]), "msp": msp, "energy": energy}


def digit_row(s: dict[str, np.ndarray]) -> dict[str, Any]:
    answered = ~s["declined"]
    right = int((answered & (s["predicted"] == s["label"])).sum())
    return {"images": len(s["label"]), "refused": int(s["refused"].sum()),
            "declined": float(s["declined"].mean()), "unknown": float(s["unknown"].mean()),
            "answered_accuracy": right / int(answered.sum()) if answered.any() else None,
            "accuracy": float((s["predicted"] == s["label"]).mean())}


def not_digit_row(s: dict[str, np.ndarray], digits: dict[str, np.ndarray]) -> dict[str, Any]:
    return {"images": len(s["label"]), "refused": int(s["refused"].sum()),
            "declined": float(s["declined"].mean()), "unknown": float(s["unknown"].mean()),
            **{name: separation(s[name], digits[name]) for name in SCORES}}


def pooled(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def not_digit_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| not a digit | images | refused (blank) | declined | MSP AUROC | MSP FPR95 | "
             "energy AUROC | energy FPR95 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        cells = [f"{r[s]['auroc']:.3f} | {_pct(r[s]['fpr95'])}" for s in SCORES]
        bold = "**" if name == "all not-digits" else ""
        lines.append(f"| {bold}{name}{bold} | {r['images']} | {r['refused']} | "
                     f"{_pct(r['declined'])} | {' | '.join(cells)} |")
    return lines


def digit_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| digits | images | refused (blank) | declined | right when answered |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        bold = "**" if name in ("handwritten", "printed", "all digits") else ""
        lines.append(f"| {bold}{name}{bold} | {r['images']} | {r['refused']} | "
                     f"{_pct(r['declined'])} | {_pct(r['answered_accuracy'])} |")
    return lines


def what_predict_gives(predictor: Predictor, paths: list[Path]) -> tuple[bool, bool]:
    """Whether predict's results carry "decision" and "energy" (asked of one image)."""
    for path in paths:
        r = predictor.predict([str(path)], top_k=1, errors="record")[0]
        if "error" not in r:
            return "decision" in r, "energy" in r
    return False, False


# ---------------------------------------------------------------- command line


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="run directory or built-in model name")
    ap.add_argument("--data-dir", help="where mnist/ and fashion-mnist/ are (default: "
                    "vit-mqa's lookup order)")
    ap.add_argument("--num", type=int, default=200, help="images per source and per digit "
                    "style")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", metavar="DIR", help="write the images here instead of a "
                    "temporary folder")
    ap.add_argument("--json", metavar="FILE", help="write the record as JSON")
    return ap.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[Predictor, tuple[np.ndarray, np.ndarray],
                                             np.ndarray | None]:
    """The predictor, MNIST's test digits and labels, Fashion-MNIST's test images (None,
    with a note, when that dataset is not there)."""
    predictor = Predictor(args.model)
    mnist, _ = load_idx_dataset(DATASETS["mnist"], args.data_dir, download=False)
    try:
        fashion, _ = load_idx_dataset(DATASETS["fashion-mnist"], args.data_dir,
                                      download=False)
    except VitMqaError as e:
        print(f"none_of_these: clothing sources skipped: {e}", file=sys.stderr)
        return predictor, (mnist["test-images"], mnist["test-labels"]), None
    return predictor, (mnist["test-images"], mnist["test-labels"]), fashion["test-images"]


def uci(out: Path, num: int, seed: int) -> dict[str, list[tuple[Path, int]]]:
    """heldout_check.py's UCI digits, when scikit-learn is installed (else none)."""
    try:
        from heldout_check import uci_files

        return uci_files(out, min(num, 1797), seed)
    except ImportError:
        print("none_of_these: scikit-learn is not installed: UCI digits skipped",
              file=sys.stderr)
        return {}


def all_files(args: argparse.Namespace, digits: tuple[np.ndarray, np.ndarray],
              clothing: np.ndarray | None, out: Path
              ) -> tuple[dict[str, list[tuple[Path, int]]], dict[str, list[tuple[Path, int]]]]:
    """(digit style -> files, not-digit source -> files), every image written."""
    fonts, letter_fonts = held_out_fonts(), held_out_letter_fonts()
    styles = [s for s in DIGIT_STYLES if fonts or s not in PRINTED]
    sources = [s for s in NOT_DIGITS if (letter_fonts or s not in LETTER_SOURCES)
               and (clothing is not None or s not in CLOTHING_SOURCES)]
    if not fonts or not letter_fonts:
        print("none_of_these: no held-out fonts: printed digits or letters skipped "
              "(Debian: apt install fonts-freefont-ttf fonts-noto-core fonts-urw-base35)",
              file=sys.stderr)
    bar = tqdm(styles + sources, desc="rendering", disable=not sys.stderr.isatty())
    digit, other = {}, {}
    for name in bar:
        if name in DIGIT_STYLES:
            digit[name] = digit_files(name, digits, fonts, args.num, args.seed, out)
        else:
            other[name] = not_digit_files(name, letter_fonts, clothing, args.num,
                                          args.seed, out)
    digit.update(uci(out, args.num, args.seed))
    return digit, other


def evaluate(predictor: Predictor, digit: dict[str, list[tuple[Path, int]]],
             other: dict[str, list[tuple[Path, int]]]
             ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(digit rows, not-digit rows), each with its totals."""
    bar = tqdm([*digit, *other], desc="predicting", disable=not sys.stderr.isatty())
    scored = {name: score(predictor, {**digit, **other}[name]) for name in bar}
    groups = {"handwritten": [s for s in digit if s not in PRINTED],
              "printed": [s for s in digit if s in PRINTED], "all digits": list(digit)}
    digit_rows = {name: digit_row(scored[name]) for name in digit}
    for group, names in groups.items():
        if names:
            digit_rows[group] = digit_row(pooled([scored[n] for n in names]))
    all_digits = pooled([scored[n] for n in digit])
    other_rows = {name: not_digit_row(scored[name], all_digits) for name in other}
    if other:
        other_rows["all not-digits"] = not_digit_row(pooled([scored[n] for n in other]),
                                                     all_digits)
    return digit_rows, other_rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not 1 <= args.num <= 10000:
        print("none_of_these: error: --num outside 1..10000", file=sys.stderr)
        return 2
    try:
        predictor, digits, clothing = load(args)
    except VitMqaError as e:
        print(f"none_of_these: error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        digit, other = all_files(args, digits, clothing, Path(args.keep or tmp))
        gives = what_predict_gives(predictor, [p for f in digit.values() for p, _ in f])
        digit_rows, other_rows = evaluate(predictor, digit, other)
    elapsed = time.perf_counter() - start
    rule = ('"decision" is not "answer"' if gives[0] else
            f"unsure (top probability under {predictor.min_confidence:.2f}; these results "
            "carry no \"decision\")")
    print("\n".join(not_digit_table(other_rows)) + "\n")
    print("\n".join(digit_table(digit_rows)))
    print(f"\ndeclined = {rule}; an image refused as blank (\"no ink found\") counts as "
          "declined, and scores as least like a digit. MSP = max softmax probability at "
          f"T = {predictor.temperature:.3f}, negated; energy = -T logsumexp(logits / T), "
          f"{'from predict' if gives[1] else 'computed from the logits'}. FPR95: share of "
          "all real digits flagged at the threshold that flags 95 % of the not-digits.")
    print(f"{elapsed:.0f} s, {describe()['cpu']}, {torch.get_num_threads()} threads")
    if args.json:
        write_json(args.json, {
            "model": str(args.model), "num": args.num, "seed": args.seed,
            "not_digits": other_rows, "digits": digit_rows, "declined_rule": rule,
            "energy_from_predict": gives[1], "temperature": predictor.temperature,
            "min_confidence": predictor.min_confidence,
            "digit_fonts": [f.name for f in held_out_fonts()],
            "letter_fonts": [f.name for f in held_out_letter_fonts()], "seconds": elapsed,
            "command": "python " + " ".join(sys.argv), "machine": describe()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
