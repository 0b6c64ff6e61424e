"""Multi-head -> grouped / multi-query conversion on MNIST, with uptraining.

Takes a trained multi-head run, converts it to each K/V head count by mean-pooling
the K/V heads of each group (Ainslie et al. 2023), evaluates right after conversion,
then uptrains with `train --init-from` for 5% and 10% of the original run's steps.
Prints a markdown table and writes JSON.

    vit-mqa train --data-dir ../shared/data --num-kv-heads 4 --out runs/mha
    python benchmarks/gqa_uptraining.py runs/mha --data-dir ../shared/data --out runs/gqa
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vit_mqa.checkpoint import RESULTS_NAME, read_config
from vit_mqa.config.recipe import build_config
from vit_mqa.data.datasets import DataConfig, load_data
from vit_mqa.evaluation.evaluate import evaluate
from vit_mqa.models.adapt import convert_kv_heads
from vit_mqa.models.vit import count_parameters, load_model_dir, save_model_dir
from vit_mqa.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mha_run")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="runs/gqa-uptraining")
    parser.add_argument("--kv-heads", type=int, nargs="+", default=None)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10])
    parser.add_argument("--uptrain-lr", type=float, default=5e-4)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mha, config = load_model_dir(args.mha_run)
    source_results = json.loads((Path(args.mha_run) / RESULTS_NAME).read_text())
    total_steps = source_results["steps"]
    data_cfg = DataConfig(**{**config["data"], "data_dir": args.data_dir})
    data = load_data(data_cfg)
    pre = mha.preprocess
    heads = mha.config.num_heads
    kv_list = args.kv_heads or sorted({heads, heads // 2, 1}, reverse=True)
    extra = {k: v for k, v in read_config(args.mha_run).items() if k != "model"}

    rows = []
    for kv in kv_list:
        converted = convert_kv_heads(mha, kv)
        conv_dir = out / f"kv{kv}-converted"
        if not conv_dir.exists():
            save_model_dir(converted, conv_dir, extra)
        row = {"num_kv_heads": kv, "parameters": count_parameters(converted),
               "converted": evaluate(converted, data.test, pre)["accuracy"]}
        for fraction in args.fractions:
            steps = max(1, round(fraction * total_steps))
            run_dir = out / f"kv{kv}-uptrain{round(100 * fraction)}"
            if (run_dir / RESULTS_NAME).exists():
                result = json.loads((run_dir / RESULTS_NAME).read_text())
            else:
                # One epoch's schedule, cut at `steps`: short warm-up, lower peak lr.
                cfg = build_config(config.get("preset"), overrides={
                    "data_dir": args.data_dir, "epochs": 1, "max_steps": steps,
                    "lr": args.uptrain_lr, "warmup_epochs": 0.02},
                    init_model=converted.config.to_dict())
                result = train(cfg, run_dir, init_from=conv_dir, data=data, quiet=True)
            row[f"uptrain_{round(100 * fraction)}pct"] = result["test_accuracy"]
            row[f"uptrain_{round(100 * fraction)}pct_steps"] = steps
        rows.append(row)
        print(json.dumps(row), flush=True)

    (out / "gqa_uptraining.json").write_text(json.dumps(
        {"source": str(args.mha_run), "source_test_accuracy": source_results["test_accuracy"],
         "source_steps": total_steps, "rows": rows}, indent=2) + "\n")
    cols = [f"{round(100 * f)}%" for f in args.fractions]
    print(f"\nsource: {args.mha_run}, {heads} heads / {heads} K/V heads, test accuracy "
          f"{100 * source_results['test_accuracy']:.2f}%, {total_steps} steps\n")
    print("| K/V heads | parameters | after conversion | "
          + " | ".join(f"after {c} uptraining" for c in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for r in rows:
        ups = " | ".join(f"{100 * r[f'uptrain_{round(100 * f)}pct']:.2f}%"
                         for f in args.fractions)
        print(f"| {r['num_kv_heads']} | {r['parameters']:,} | {100 * r['converted']:.2f}% | "
              f"{ups} |")


if __name__ == "__main__":
    main()
