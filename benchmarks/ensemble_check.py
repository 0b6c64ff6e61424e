"""How much trained runs disagree: each run's test accuracy, the accuracy of the average of
their probabilities (every subset of two or more runs), and how many test images exactly
k of the n runs get wrong.

An ensemble that scores little above its members says their errors are shared: the
test images they miss are hard for this family of recipes, and averaging weights or
distilling from the ensemble cannot reach beyond it. Nothing here selects anything.

    python benchmarks/ensemble_check.py runs/a/seed0 runs/b/seed0 runs/c/seed0:last.safetensors \\
        --data-dir ../shared/data --json-out benchmarks/results/targets/ensemble.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from typing import Any

import torch

from vit_mqa.checkpoint import write_json
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.evaluate import load_run, predict_logits

# Every subset of up to 12 runs is 4,083 averages of (10,000, classes) tensors: seconds.
MAX_RUNS = 12


def ensemble_check(runs: list[str], data_dir: str | None = None,
                   batch_size: int = 1000) -> dict[str, Any]:
    """``runs``: run folders, each optionally ``:weights.safetensors`` (default the run's
    selected weights). They must share their test split and classes."""
    probs, labels, classes = [], None, None
    for spec in runs:
        path, _, weights = spec.partition(":")
        model, _, data = load_run(path, weights or "model.safetensors", data_dir=data_dir)
        if labels is None:
            labels, classes = data.test.labels, data.classes
        elif data.classes != classes or not torch.equal(data.test.labels, labels):
            raise VitMqaError(f"{spec} has another test split than {runs[0]}")
        logits = predict_logits(model, data.test.images, data.preprocess, batch_size)
        probs.append(logits.softmax(dim=-1))
    assert labels is not None

    def accuracy(members: tuple[int, ...]) -> float:
        mean = torch.stack([probs[i] for i in members]).mean(dim=0)
        return (mean.argmax(dim=1) == labels).float().mean().item()

    wrong = torch.stack([p.argmax(dim=1) != labels for p in probs]).sum(dim=0)
    report: dict[str, Any] = {
        "runs": {spec: accuracy((i,)) for i, spec in enumerate(runs)},
        "missed_by_k_runs": {str(k): int((wrong == k).sum()) for k in range(1, len(runs) + 1)},
        "ensembles": {},
    }
    for size in range(2, len(runs) + 1):
        scores = {c: accuracy(c) for c in itertools.combinations(range(len(runs)), size)}
        best = max(scores, key=scores.__getitem__)
        report["ensembles"][str(size)] = {
            "subsets": len(scores), "mean": statistics.fmean(scores.values()),
            "min": min(scores.values()), "max": scores[best],
            "best_subset": [runs[i] for i in best]}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN[:WEIGHTS]",
                        help="training run folders, optionally with a weights file")
    parser.add_argument("--data-dir", help="where the dataset files are (default: the runs')")
    parser.add_argument("--json-out", metavar="FILE", help="write the report as JSON")
    args = parser.parse_args(argv)
    if not 2 <= len(args.runs) <= MAX_RUNS:
        parser.error(f"give 2 to {MAX_RUNS} runs, not {len(args.runs)}")
    try:
        report = ensemble_check(args.runs, args.data_dir)
        if args.json_out:
            write_json(args.json_out, report)
    except (VitMqaError, OSError) as e:
        sys.exit(f"ensemble_check: error: {e}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
