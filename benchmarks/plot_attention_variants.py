"""Plot multi-query, grouped-query and multi-head attention side by side, from recorded runs.

Reads only committed records (nothing is measured here):

- ``benchmarks/results/cpu/table.json`` (``python benchmarks/throughput.py --scaling``):
  parameters and inference images/s of the default model shape (``mnist-fast``) with 1, 2
  and 4 K/V heads;
- ``benchmarks/results/tta/{mqa,gqa,gqa-s1,mha,mha-s1}.json``
  (``benchmarks/time_to_accuracy.py --preset mnist-fast [--set num_kv_heads=N]``): images/s
  over whole 10-epoch training runs and the MNIST test accuracy they reached.

Writes ``docs/images/attention-variants.png`` (needs matplotlib: ``pip install -e .[notebook]``)
and prints the figures it plotted, as a markdown table.

    python benchmarks/plot_attention_variants.py [--out docs/images/attention-variants.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# name, K/V heads, bench implementation, time-to-accuracy records (one per seed group)
VARIANTS = [
    ("MQA", 1, "vit-mqa-mqa", ["mqa.json"]),
    ("GQA", 2, "vit-mqa-gqa", ["gqa.json", "gqa-s1.json"]),
    ("MHA", 4, "vit-mqa-mha", ["mha.json", "mha-s1.json"]),
]
COLORS = ["#1b9e77", "#7570b3", "#d95f02"]


def load() -> list[dict]:
    table = json.loads((RESULTS / "cpu" / "table.json").read_text())
    rows = []
    for name, kv, impl, files in VARIANTS:
        bench = {r["mode"]: r for r in table["results"]
                 if r["shape"] == "mnist-fast" and r["impl"] == impl}
        runs = [run for f in files
                for run in json.loads((RESULTS / "tta" / f).read_text())["runs"]]
        train_ips = [statistics.fmean(e["images_per_s"] for e in run["epochs"]) for run in runs]
        accuracy = [100 * run["final_test_accuracy"] for run in runs]
        params = {bench["train"]["parameters"], bench["infer"]["parameters"],
                  *(run["parameters"] for run in runs)}
        if len(params) != 1:
            raise SystemExit(f"{name}: the records disagree on the parameter count: {params}")
        rows.append({
            "name": name, "kv_heads": kv, "parameters": params.pop(),
            "seeds": [run["seed"] for run in runs],
            "train_images_per_s": statistics.fmean(train_ips),
            "train_images_per_s_std": statistics.stdev(train_ips) if len(runs) > 1 else 0.0,
            "infer_images_per_s": bench["infer"]["images_per_s"],
            "infer_batch": bench["infer"]["batch_size"],
            "accuracy": statistics.fmean(accuracy),
            "accuracy_std": statistics.stdev(accuracy) if len(runs) > 1 else 0.0,
        })
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['name']}\n{r['kv_heads']} K/V" for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.1))
    panels = [
        ("parameters (thousands)", [r["parameters"] / 1e3 for r in rows], None, "{:.0f}k"),
        ("training images/s\n(10-epoch runs)", [r["train_images_per_s"] for r in rows],
         [r["train_images_per_s_std"] for r in rows], "{:,.0f}"),
        ("inference images/s\n(batch 256)", [r["infer_images_per_s"] for r in rows], None,
         "{:,.0f}"),
    ]
    for ax, (title, values, err, fmt) in zip(axes, panels):
        bars = ax.bar(x, values, color=COLORS, yerr=err, capsize=4 if err else 0)
        ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8,
                     padding=2 if not err else 8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(values) * 1.22)
        ax.set_xticks(list(x), labels, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    ax = axes[3]
    for i, r in enumerate(rows):
        ax.errorbar(i, r["accuracy"], yerr=r["accuracy_std"], fmt="o", color=COLORS[i],
                    capsize=4, markersize=7)
        ax.annotate(f"{r['accuracy']:.2f}", (i, r["accuracy"]), xytext=(9, -3),
                    textcoords="offset points", fontsize=8)
    seeds = " / ".join(str(len(r["seeds"])) for r in rows)
    ax.set_title(f"MNIST test accuracy (%)\nmean ± sd, {seeds} seeds", fontsize=10)
    ax.set_xlim(-0.5, len(rows) - 0.3)
    ax.set_ylim(98.6, 99.3)
    ax.set_xticks(list(x), labels, fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle("Default model (mnist-fast: width 64, depth 6, 4 query heads), "
                 "2-core AMD EPYC VM (AVX2), fp32", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" /
                        "attention-variants.png")
    args = parser.parse_args()
    rows = load()
    plot(rows, args.out)
    print("| attention | K/V heads | parameters | training images/s | inference images/s "
          "| MNIST test accuracy | seeds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['kv_heads']} | {r['parameters']:,} "
              f"| {r['train_images_per_s']:,.0f} | {r['infer_images_per_s']:,.0f} "
              f"| {r['accuracy']:.2f} ± {r['accuracy_std']:.2f} % "
              f"| {len(r['seeds'])} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
