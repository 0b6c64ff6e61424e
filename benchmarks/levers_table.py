"""Ablation rows from ``time_to_accuracy.py`` reports: one row per report, one change each.

For every run it shows what the run selected (the best validation epoch) beside what the
last epoch scored, so that the same records also answer which selection generalises
better. Figures are means over the report's seeds.

    python benchmarks/levers_table.py benchmarks/results/levers/mnist-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

BASE_KEYS = {"time_budget", "epochs"}  # the budget itself, not a change


def describe(overrides: dict[str, Any]) -> str:
    changes = [f"{k}={v}" for k, v in overrides.items() if k not in BASE_KEYS]
    return ", ".join(changes) or "none"


def row(path: Path) -> str:
    report = json.loads(path.read_text())
    runs = report["runs"]

    def mean(values: list[float]) -> str:
        m = statistics.mean(values)
        if len(values) == 1:
            return f"{100 * m:.2f}"
        return f"{100 * m:.2f} ± {100 * statistics.stdev(values):.2f}"

    selected, last, val_sel, val_last = [], [], [], []
    for run in runs:
        epochs = run["epochs"]
        chosen = next(e for e in epochs if e["epoch"] == run["best_epoch"])
        selected.append(chosen["test_accuracy"])
        last.append(epochs[-1]["test_accuracy"])
        val_sel.append(chosen["val_accuracy"])
        val_last.append(epochs[-1]["val_accuracy"])
    n_epochs = statistics.mean(len(r["epochs"]) for r in runs)
    time_s = statistics.mean(r["train_time_s"] for r in runs)
    img_s = statistics.mean(statistics.mean(e["images_per_s"] for e in r["epochs"]) for r in runs)
    return (f"| {report['preset']} | {describe(report.get('overrides', {}))} | {len(runs)} | "
            f"{runs[0]['parameters']:,} | {n_epochs:.0f} | {time_s:.0f} s | {img_s:,.0f} | "
            f"{mean(selected)} % | {mean(last)} % | {mean(val_sel)} / {mean(val_last)} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    args = parser.parse_args()
    print("| preset | change | seeds | params | epochs | training | img/s | test (selected: "
          "best val) | test (last epoch) | val: selected / last |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.reports:
        file = path / "time_to_accuracy.json" if path.is_dir() else path
        try:
            print(row(file))
        except (OSError, KeyError, StopIteration, json.JSONDecodeError) as e:
            sys.exit(f"levers_table: error: {file} is not a time_to_accuracy report ({e})")


if __name__ == "__main__":
    main()
