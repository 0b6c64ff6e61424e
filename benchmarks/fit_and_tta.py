"""What limits a trained run: its selected weights scored on the training images without
augmentation (how well it fits), on validation and test, and with test-time augmentation.

A training accuracy far above the test accuracy says the run is limited by what it
generalises (more data, more regularisation); one close to it says the model or the
schedule is too small to fit the training set. Nothing here selects anything: the
test figures are reported, never tuned on.

    python benchmarks/fit_and_tta.py runs/fmnist-30min/seed0 --tta flip,flip+shift \\
        --json-out benchmarks/results/targets/fmnist-30min-seed0-fit-and-tta.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vit_mqa.checkpoint import write_json
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.evaluate import TTA, evaluate, load_run


def fit_and_tta(run_dir: str, tta: list[str], data_dir: str | None = None,
                batch_size: int = 1000) -> dict[str, Any]:
    """Accuracy of the run's selected weights on each split, and on validation and test
    under each test-time augmentation in ``tta``."""
    model, _, data = load_run(run_dir, "model.safetensors", data_dir=data_dir)
    pre = data.preprocess  # the run's normalisation, as training scored its epochs
    report: dict[str, Any] = {"run": run_dir}
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        report[name] = evaluate(model, split, pre, batch_size)["accuracy"]
    for mode in tta:
        for name, split in (("val", data.val), ("test", data.test)):
            report[f"{name}_tta_{mode}"] = evaluate(model, split, pre, batch_size,
                                                    tta=mode)["accuracy"]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a training run's folder")
    parser.add_argument("--tta", default="", help="comma-separated test-time augmentations "
                        f"to score ({', '.join(t for t in TTA if t != 'none')})")
    parser.add_argument("--data-dir", help="where the dataset files are (default: the run's)")
    parser.add_argument("--json-out", metavar="FILE", help="write the report as JSON")
    args = parser.parse_args(argv)
    modes = [m for m in args.tta.split(",") if m]
    unknown = [m for m in modes if m not in TTA]
    if unknown:
        parser.error(f"unknown test-time augmentation {unknown[0]!r}; choose from "
                     f"{', '.join(TTA)}")
    try:
        report = fit_and_tta(args.run_dir, modes, args.data_dir)
        if args.json_out:
            write_json(args.json_out, report)
    except (VitMqaError, OSError) as e:
        sys.exit(f"fit_and_tta: error: {e}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
