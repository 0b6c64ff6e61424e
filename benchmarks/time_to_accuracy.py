"""Time to accuracy: train a preset with several seeds and record, after every epoch,
the training wall time, validation and test accuracy and images/s.

Training goes through ``vit_mqa.training.loop.train`` exactly as ``vit-mqa train`` does; the
test set is scored in an epoch hook whose time is not counted as training time.
Model selection (the best checkpoint) uses the validation split only: the test
figures are reported, never tuned on. Prints a markdown summary (mean ± std over
seeds) and writes JSON.

    python benchmarks/time_to_accuracy.py --preset mnist-fast --seeds 0 1 2 \\
        --data-dir ../shared/data --out runs/tta-mnist-fast
    python benchmarks/time_to_accuracy.py --preset fmnist-fast --seeds 0 1 2 --out runs/tta-f
    python benchmarks/time_to_accuracy.py --preset mnist-fast --set num_kv_heads=4 ...

Seeds of one recipe trained in separate runs (for instance on different days) are merged
into one report, after checking that every run used the same settings but the seed:

    python benchmarks/time_to_accuracy.py --combine runs/a runs/b --out runs/ab
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import machine

from vit_mqa.checkpoint import write_json
from vit_mqa.config.recipe import build_config
from vit_mqa.data.datasets import DataConfig, load_data
from vit_mqa.errors import VitMqaError
from vit_mqa.evaluation.evaluate import evaluate
from vit_mqa.training.loop import train

# Test-accuracy thresholds reported per dataset (the targets in docs/benchmarks.md).
THRESHOLDS = {"mnist": (0.990, 0.995, 0.997), "fashion-mnist": (0.92, 0.93, 0.935)}


def parse_setting(text: str) -> tuple[str, Any]:
    name, _, raw = text.partition("=")
    if not raw:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return name.replace("-", "_"), value


def run_seed(preset: str, seed: int, overrides: dict[str, Any], data_dir: str | None,
             out: Path, quiet: bool) -> dict[str, Any]:
    config = build_config(preset, overrides={**overrides, "seed": seed,
                                             **({"data_dir": data_dir} if data_dir else {})})
    data = load_data(DataConfig(**config["data"]))
    pre = data.preprocess
    batch = config["train"]["eval_batch_size"]

    def score_test(record: dict[str, Any], model: Any) -> dict[str, Any]:
        test = evaluate(model, data.test, pre, batch, device=next(model.parameters()).device)
        return {"test_accuracy": test["accuracy"]}

    run_dir = out / f"seed{seed}"
    results = train(config, run_dir, data=data, quiet=quiet, on_epoch_end=score_test)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if line.strip()]
    thresholds = THRESHOLDS.get(config["data"]["dataset"], ())
    reached = {}
    for t in thresholds:
        hit = next((e for e in epochs if e["test_accuracy"] >= t), None)
        reached[f"{100 * t:g}"] = None if hit is None else {"epoch": hit["epoch"],
                                                             "elapsed_s": hit["elapsed_s"]}
    return {"seed": seed, "final_test_accuracy": results["test_accuracy"],
            "best_epoch": results["best_epoch"], "train_time_s": results["train_time_s"],
            "parameters": results["parameters"], "reached": reached, "epochs": epochs,
            "config": config, "machine": machine.describe()}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    acc = mean_std([r["final_test_accuracy"] for r in runs])
    time_s = mean_std([r["train_time_s"] for r in runs])
    img_s = mean_std([statistics.mean(e["images_per_s"] for e in r["epochs"]) for r in runs])
    reached = {}
    for key in runs[0]["reached"]:
        hits = [r["reached"][key] for r in runs]
        times = [h["elapsed_s"] for h in hits if h is not None]
        reached[key] = {"seeds_reaching": len(times),
                        "elapsed_s": mean_std(times) if times else None}
    return {"seeds": [r["seed"] for r in runs], "test_accuracy": acc, "train_time_s": time_s,
            "images_per_s": img_s, "parameters": runs[0]["parameters"], "reached": reached}


def without_seed(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the seed (and the machine-specific data path) left out."""
    train = {k: v for k, v in config["train"].items() if k != "seed"}
    data = {k: v for k, v in config["data"].items() if k != "data_dir"}
    return {**config, "train": train, "data": data}


def load_report(path: Path) -> dict[str, Any]:
    file = path / "time_to_accuracy.json" if path.is_dir() else path
    try:
        report = json.loads(file.read_text())
    except FileNotFoundError:
        raise VitMqaError(f"no report at {file}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VitMqaError(f"{file} is not a time_to_accuracy report: {e}") from None
    runs = report.get("runs") if isinstance(report, dict) else None
    if (not isinstance(runs, list) or not runs or "preset" not in report
            or not all(isinstance(r, dict) and {"seed", "config", "epochs"} <= r.keys()
                       for r in runs)):
        raise VitMqaError(f"{file} is not a time_to_accuracy report")
    return report


def combine(paths: list[Path]) -> dict[str, Any]:
    """Merge reports of one recipe, each from its own run, into one report."""
    reports = [load_report(path) for path in paths]
    recipe = (reports[0]["preset"], reports[0].get("overrides", {}))
    reference = without_seed(reports[0]["runs"][0]["config"])
    for report, path in zip(reports, paths):
        if (report["preset"], report.get("overrides", {})) != recipe:
            raise VitMqaError(f"{path} holds preset {report['preset']!r} with overrides "
                              f"{report.get('overrides', {})}, not {recipe[0]!r} with {recipe[1]}")
        for run in report["runs"]:
            if without_seed(run["config"]) != reference:
                raise VitMqaError(f"seed {run['seed']} in {path} was trained with other settings")
    runs = sorted((run for report in reports for run in report["runs"]),
                  key=lambda run: run["seed"])
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise VitMqaError(f"a seed appears in more than one report: {seeds}")
    return {"preset": recipe[0], "overrides": recipe[1], "summary": summarize(runs), "runs": runs}


def markdown(preset: str, overrides: dict[str, Any], summary: dict[str, Any]) -> str:
    acc, t = summary["test_accuracy"], summary["train_time_s"]
    parts = [f"preset {preset}" + (f" + {overrides}" if overrides else ""),
             f"{len(summary['seeds'])} seeds", f"{summary['parameters']:,} params",
             f"test {100 * acc[0]:.2f} ± {100 * acc[1]:.2f} %",
             f"training {t[0]:.0f} ± {t[1]:.0f} s",
             f"{summary['images_per_s'][0]:,.0f} img/s"]
    for key, hit in summary["reached"].items():
        if hit["elapsed_s"] is None:
            parts.append(f">= {key} %: not reached")
        else:
            parts.append(f">= {key} %: {hit['elapsed_s'][0]:.0f} ± {hit['elapsed_s'][1]:.0f} s "
                         f"({hit['seeds_reaching']}/{len(summary['seeds'])} seeds)")
    return "| " + " | ".join(parts) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mnist-fast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", type=parse_setting, action="append", default=[],
                        metavar="NAME=VALUE", help="override a setting (repeatable)")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="REPORT",
                        help="merge these reports (directories or JSON files) instead of "
                             "training")
    args = parser.parse_args()
    out = Path(args.out)
    overrides = dict(args.set)
    try:
        if args.combine:
            report = combine(args.combine)
        else:
            runs = [run_seed(args.preset, s, overrides, args.data_dir, out, args.quiet)
                    for s in args.seeds]
            report = {"preset": args.preset, "overrides": overrides,
                      "summary": summarize(runs), "runs": runs}
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "time_to_accuracy.json", report)
    except (VitMqaError, OSError) as e:  # bad setting, preset, data, report, run directory
        sys.exit(f"time_to_accuracy: error: {e}")
    print(markdown(report["preset"], report["overrides"], report["summary"]))


if __name__ == "__main__":
    main()
