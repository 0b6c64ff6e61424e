"""Train and export the models that ship inside the package (src/vit_mqa/pretrained/).

    python scripts/pretrained.py train mnist --data-dir ../shared/data
    python benchmarks/people_digits.py runs/pretrained-mnist --data-dir ../shared/data \\
        --json benchmarks/results/pretrained/mnist-people.json
    python benchmarks/real_digits.py runs/pretrained-mnist --data-dir ../shared/data \\
        --json benchmarks/results/pretrained/mnist-real.json
    python benchmarks/heldout_check.py runs/pretrained-mnist \\
        --json benchmarks/results/pretrained/mnist-heldout.json
    python scripts/pretrained.py export mnist runs/pretrained-mnist \\
        --people benchmarks/results/pretrained/mnist-people.json \\
        --real benchmarks/results/pretrained/mnist-real.json \\
        --heldout benchmarks/results/pretrained/mnist-heldout.json

and the same for fashion-mnist (`train fashion-mnist`, `export fashion-mnist RUN`). `train`
runs the model's preset with seed 0; `export` copies the run's best weights and its
config.json (the preprocessing, the fitted temperature, the recipe) into the package,
with a card.json of the figures, the CPU, the size and the SHA-256 of the weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from machine import describe  # noqa: E402

from vit_mqa.checkpoint import atomic_write_text, file_sha256, write_json  # noqa: E402
from vit_mqa.models.builtin import BUILTIN_MODELS, CARD_NAME, PREFIX, builtin_root  # noqa: E402

SEED = 0
SUMMARIES = {
    "mnist": "handwritten and printed digits 0-9, trained on MNIST with augmentation for "
             "real-world digits and printed digits from the DejaVu and Liberation fonts",
    "fashion-mnist": "the ten Fashion-MNIST clothing classes, 28x28 grey images",
}


# `train --fine-tune`: the shipped model trained on further with its preset's data and
# augmentation, "not a digit" / "none of these" pictures included (outlier exposure, as
# Hendrycks et al. fine-tune a trained model), instead of a run from scratch.
FINE_TUNES = {"mnist": ["--epochs", "4", "--lr", "5e-4", "--warmup-epochs", "0.2"],
              "fashion-mnist": ["--epochs", "3", "--lr", "1e-3", "--warmup-epochs", "0.2"]}


def train(name: str, data_dir: str | None, out: Path, fine_tune: str | None = None) -> int:
    preset = BUILTIN_MODELS[PREFIX + name]
    command = [sys.executable, "-m", "vit_mqa", "train", "--preset", preset, "--seed",
               str(SEED), "--out", str(out)]
    if fine_tune:
        command += ["--init-from", fine_tune, *FINE_TUNES[name]]
    if data_dir:
        command += ["--data-dir", data_dir]
    return subprocess.run(command).returncode


def _figures(name: str, results: dict[str, Any], people: Path | None,
             real: Path | None, heldout: Path | None) -> list[dict[str, Any]]:
    dataset = "MNIST" if name == "mnist" else "Fashion-MNIST"
    figures = [{"what": f"{dataset} test set", "accuracy": results["test_accuracy"],
                "images": 10000, "command": "vit-mqa eval " + PREFIX + name}]
    if people is not None:
        record = json.loads(people.read_text())
        figures.append({"what": "MNIST test digits drawn and photographed as people do "
                        "(benchmarks/people_digits.py)",
                        "accuracy": record["overall"]["after"],
                        "images": sum(r["after"]["total"] for r in record["styles"].values()),
                        "command": record.get("command")})
    if real is not None:
        record = json.loads(real.read_text())
        for part in ("handwritten", "printed"):
            styles = {s: r for s, r in record["styles"].items()
                      if (s.startswith("print") == (part == "printed"))}
            figures.append({"what": f"real-digit styles, {part} (benchmarks/real_digits.py: "
                            + ", ".join(styles) + ")",
                            "accuracy": record["overall"][part],
                            "images": sum(r["total"] for r in styles.values()),
                            "command": record.get("command")})
    if heldout is not None:
        record = json.loads(heldout.read_text())
        figures.append({"what": "held-out check: UCI handwriting (8x8 scans, both polarities) "
                        "and every installed font's digits, clean and photographed "
                        "(benchmarks/heldout_check.py)",
                        "accuracy": record["overall"],
                        "images": sum(r["total"] for r in record["styles"].values()),
                        "styles": {s: r["accuracy"] for s, r in record["styles"].items()},
                        "command": record.get("command")})
    return figures


def _predicted_sample(name: str, target: Path, data_dir: str | None) -> dict[str, Any]:
    """Accuracy on the first 1,000 test images through the model's own preprocessing, as
    `vit-mqa predict` reads them."""
    import numpy as np

    from vit_mqa.data.datasets import DATASETS, load_idx_dataset
    from vit_mqa.evaluation.predict import Predictor

    arrays, _ = load_idx_dataset(DATASETS[name], data_dir, download=False)
    images, labels = arrays["test-images"][:1000], arrays["test-labels"][:1000]
    results = Predictor(target).predict(list(images), top_k=1)
    right = np.mean([r["top"][0]["index"] == y for r, y in zip(results, labels)])
    return {"what": "the first 1,000 test images through its preprocessing (vit-mqa predict)",
            "accuracy": float(right), "images": 1000}


def _declines(path: Path | None) -> list[dict[str, Any]]:
    """Card figures of what the model declines, from a declines benchmark's record."""
    if path is None:
        return []
    record = json.loads(path.read_text())
    if "not_digits" in record:  # benchmarks/none_of_these.py
        rows = [("pictures that are no digit, in styles it never trained on (letters in "
                 "held-out fonts, drawn letters, clothing, scenes, drawn objects)",
                 record["not_digits"]["all not-digits"]),
                ("real digits from elsewhere (real_styles.py's 14 styles and UCI)",
                 record["digits"]["all digits"])]
    else:  # benchmarks/fashion_declines.py
        rows = [(f"{source} (benchmarks/fashion_declines.py)", row)
                for source, row in record["sources"].items()]
    return [{"what": what, "declined": row["declined"], "images": row["images"],
             **({"answered_accuracy": row["answered_accuracy"]}
                if row.get("answered_accuracy") is not None else {}),
             "command": record.get("command")} for what, row in rows]


def export(name: str, run_dir: Path, people: Path | None, real: Path | None,
           heldout: Path | None, data_dir: str | None, shared_cpu: bool,
           declines: Path | None = None, fine_tuned: bool = False) -> int:
    results = json.loads((run_dir / "results.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    if config.get("preset") != BUILTIN_MODELS[PREFIX + name] or config["train"]["seed"] != SEED:
        print(f"pretrained: error: {run_dir} is not a run of preset "
              f"{BUILTIN_MODELS[PREFIX + name]} with seed {SEED}", file=sys.stderr)
        return 1
    config["data"]["data_dir"] = None  # the training machine's path means nothing elsewhere
    target = builtin_root() / name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "model.safetensors", target / "model.safetensors.tmp")
    (target / "model.safetensors.tmp").replace(target / "model.safetensors")
    write_json(target / "config.json", config)
    weights = target / "model.safetensors"
    machine = describe()
    card = {
        "name": PREFIX + name, "summary": SUMMARIES[name],
        "preset": config["preset"], "seed": SEED,
        "command": f"python scripts/pretrained.py train {name}"
                   + (" --fine-tune" if fine_tuned else "")
                   + f" && python scripts/pretrained.py export {name} RUN",
        "cpu": f"{machine['cpu']}, {machine['cores']} cores, "
               f"{'/'.join(machine['cpu_flags']) or 'no AVX'}",
        "train_time_s": results["train_time_s"],
        "train_time_note": ("other work shared the CPU during training"
                            if shared_cpu else "alone on the machine"),
        "epochs": config["train"]["epochs"], "parameters": results["parameters"],
        "size_bytes": weights.stat().st_size, "sha256": file_sha256(weights),
        "temperature": config["calibration"]["temperature"],
        "thresholds": config["calibration"].get("thresholds", {}),
        "figures": [*_figures(name, results, people, real, heldout)[:1],
                    _predicted_sample(name, target, data_dir),
                    *_figures(name, results, people, real, heldout)[1:],
                    *_declines(declines)],
        "vit_mqa_version": config.get("vit_mqa_version"), "torch": machine.get("torch"),
    }
    atomic_write_text(target / CARD_NAME, json.dumps(card, indent=2) + "\n")
    print(f"exported {PREFIX}{name} to {target} ({card['size_bytes']:,} bytes, SHA-256 "
          f"{card['sha256']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    names = [n.removeprefix(PREFIX) for n in BUILTIN_MODELS]
    t = sub.add_parser("train", help="train the model's preset with seed 0")
    t.add_argument("name", choices=names)
    t.add_argument("--data-dir")
    t.add_argument("--out", type=Path, help="run directory (default: runs/pretrained-NAME)")
    t.add_argument("--fine-tune", metavar="MODEL", help="train this model (a folder, or the "
                   "built-in name) on with the preset (FINE_TUNES) instead of from scratch")
    e = sub.add_parser("export", help="copy a finished run into the package, with its card")
    e.add_argument("name", choices=names)
    e.add_argument("run_dir", type=Path)
    e.add_argument("--people", type=Path, help="benchmarks/people_digits.py --json record")
    e.add_argument("--real", type=Path, help="benchmarks/real_digits.py --json record")
    e.add_argument("--heldout", type=Path, help="benchmarks/heldout_check.py --json record")
    e.add_argument("--data-dir", help="where the test files are (default: vit-mqa's lookup)")
    e.add_argument("--shared-cpu", action="store_true", help="other work shared the CPU "
                   "during training (said so next to its training time)")
    e.add_argument("--declines", type=Path, help="benchmarks/none_of_these.py (digit model) "
                   "or benchmarks/fashion_declines.py --json record")
    e.add_argument("--fine-tuned", action="store_true", help="the run is `train --fine-tune`"
                   "'s (so the card's command says)")
    args = ap.parse_args(argv)
    if args.command == "train":
        return train(args.name, args.data_dir, args.out or Path(f"runs/pretrained-{args.name}"),
                     args.fine_tune)
    return export(args.name, args.run_dir, args.people, args.real, args.heldout,
                  args.data_dir, args.shared_cpu, args.declines, args.fine_tuned)


if __name__ == "__main__":
    sys.exit(main())
