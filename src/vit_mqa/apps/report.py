"""``vit-mqa report RUN``: figures of a training run and an index.html that shows them.

Written to ``RUN/report/``:

    curves.png             loss, accuracy and learning rate per epoch (metrics.jsonl)
    confusion.png          confusion matrix on the test split
    per_class.png          accuracy of each class on the test split
    reliability.png        accuracy against confidence, as trained and calibrated
    mistakes.png           the most confident wrong predictions
    attention_rollout.png  attention rollout over sample test images
    attention_layers.png   each layer's attention over the same images, and the rollout
    index.html             all of the above, with the headline numbers

The test split is scored with the same code as ``vit-mqa eval``. Sample images are
chosen with a fixed seed, so a report is reproducible. The figures are drawn in
:mod:`vit_mqa.apps.figures`; this module scores the run and writes the files and the page.
Needs matplotlib (``pip install 'vit-mqa[report]'``), imported only for the figures.
"""

from __future__ import annotations

import html
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoint import METRICS_NAME, WEIGHTS_NAME, atomic_write_text
from ..data.datasets import Split
from ..device import pick_device
from ..errors import VitMqaError
from ..evaluation.calibration import declining
from ..evaluation.evaluate import classification_report, evaluate, load_run
from ..models.hub import run_temperature, run_thresholds
from .figures import (
    Figures,
    attention_figures,
    figure_class,
    plot_confusion,
    plot_coverage,
    plot_curves,
    plot_mistakes,
    plot_per_class,
    plot_reliability,
    pooling_phrase,
    sample_indices,
    save_figure,
)
from .figures import confident_mistakes as confident_mistakes  # importable from here too

REPORT_DIR = "report"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's per-epoch records; [] when it has none (a model directory)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise VitMqaError(f"{path}, line {n}: not JSON ({e})") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise VitMqaError(f"{path}, line {n}: not an epoch record")
        records.append(record)
    return records


def _index_html(run_dir: Path, config: dict[str, Any], f: Figures, weights: str,
                sections: list[tuple[str, str, str]]) -> str:
    c = config["model"]
    e = html.escape
    best = max(f.metrics, key=lambda r: r.get("val_accuracy", -1)) if f.metrics else None
    facts = [
        ("run", str(run_dir)),
        ("weights", weights),
        ("test accuracy", f"{100 * f.report['accuracy']:.2f}% on {f.report['num_images']} "
                          f"images (loss {f.report['loss']:.4f})"),
        ("model", f"{c['depth']} layers, dim {c['dim']}, {c['num_heads']} heads / "
                  f"{c['num_kv_heads']} K/V heads, patch {c['patch_size']}, "
                  f"{c.get('stem', 'patch')} stem, {c['pooling']} pooling"),
        ("dataset", str(config.get("data", {}).get("dataset", "?"))),
    ]
    if best is not None:
        facts.append(("epochs", f"{len(f.metrics)} (best validation accuracy "
                                f"{100 * best['val_accuracy']:.2f}% at epoch {best['epoch']})"))
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts)
    per_class = "\n".join(
        f"<tr><td>{e(name)}</td><td>{_pct(s['accuracy'])}</td><td>{s['support']}</td></tr>"
        for name, s in f.report["per_class"].items())
    figures = "\n".join(
        f'<section><h2>{e(title)}</h2><p>{e(caption)}</p>'
        f'<img src="{e(name)}" alt="{e(title)}"></section>'
        for name, title, caption in sections)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>vit-mqa report: {e(f.run_name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; padding: 0.2em 0.8em; border-bottom: 1px solid #eee; }}
section {{ margin: 2em 0; }}
</style>
</head>
<body>
<h1>vit-mqa report: {e(f.run_name)}</h1>
<table>
{rows}
</table>
{figures}
<section><h2>Per-class accuracy (table)</h2>
<table><tr><th>class</th><th>accuracy</th><th>images</th></tr>
{per_class}
</table></section>
</body>
</html>
"""


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def write_report(run_dir: str | Path, weights: str = WEIGHTS_NAME,
                 device: torch.device | str = "auto", data_dir: str | None = None,
                 samples: int = 10, mistakes: int = 24, seed: int = 0,
                 progress: bool | None = None) -> list[Path]:
    """Write the figures and index.html into ``run_dir/report``; returns their paths
    (index.html last). ``progress``: a progress bar on stderr (None: only on a terminal)."""
    if samples < 1 or mistakes < 1:
        raise VitMqaError(f"samples and mistakes must be >= 1, got {samples}, {mistakes}")
    fig_class = figure_class()  # before any slow work: a missing extra fails at once
    run_dir = Path(run_dir)
    device = pick_device(device) if isinstance(device, str) else device
    model, config, data = load_run(run_dir, weights, device, data_dir)
    metrics = read_metrics(run_dir)
    out = run_dir / REPORT_DIR
    split: Split = data.test
    preprocess = model.preprocess

    steps: list[tuple[str, Callable[[], None]]] = []
    written: list[Path] = []
    sections: list[tuple[str, str, str]] = []
    state: dict[str, Any] = {}

    def score() -> None:
        result = evaluate(model, split, preprocess, device=device)
        report = classification_report(result["predictions"], split.labels, data.classes)
        state["logits"] = result["logits"]
        state["figures"] = Figures(run_dir.resolve().name, list(data.classes), split.images,
                                   split.labels, result["logits"].softmax(dim=1),
                                   {**report, "loss": result["loss"]}, metrics)

    def emit(name: str, title: str, caption: str, draw: Callable[[], Any]) -> None:
        def run() -> None:
            save_figure(draw(), out / name)
            written.append(out / name)
            sections.append((name, title, caption))
        steps.append((name, run))

    steps.append(("evaluating", score))
    if metrics:
        emit("curves.png", "Training curves",
             "Per epoch, from metrics.jsonl. Training loss and accuracy are measured on "
             "augmented batches (and the loss with label smoothing), so they sit below "
             "validation.",
             lambda: plot_curves(fig_class, metrics, state["figures"].run_name))
    emit("confusion.png", "Confusion matrix",
         "Test split; rows are true classes, columns predictions. Colour is the share of the "
         "row, on a compressed scale so that rare confusions show.",
         lambda: plot_confusion(fig_class, state["figures"].report, data.classes))
    emit("per_class.png", "Per-class accuracy", "Test split, with the overall accuracy dashed.",
         lambda: plot_per_class(fig_class, state["figures"].report, data.classes))
    temperature = run_temperature(config, run_dir / "config.json")
    emit("reliability.png", "Reliability of the confidence",
         "Test split: accuracy of the predictions in each band of top-1 probability, as "
         "trained and divided by the temperature fitted on validation images (what "
         "`vit-mqa predict` reports, and flags as unsure under 50 %). ECE: the expected "
         "calibration error, the bins' gap to the diagonal weighted by their images.",
         lambda: plot_reliability(fig_class, state["logits"], state["figures"].labels,
                                  temperature))
    thresholds = run_thresholds(config, run_dir / "config.json")
    emit("coverage.png", "Knowing when not to answer",
         "Test split: the accuracy of the answers kept when the least confident are "
         "declined, and where the thresholds fitted on validation images stand (what "
         "`vit-mqa predict` declines: an energy above the \"none of these\" threshold, or "
         "a calibrated top probability under the unsure one).",
         lambda: plot_coverage(fig_class, declining(state["logits"], state["figures"].labels,
                                                    temperature, thresholds)))
    emit("mistakes.png", "Most confident mistakes",
         "Wrong test predictions with the highest predicted probability.",
         lambda: plot_mistakes(fig_class, state["figures"], mistakes))

    def attention() -> None:
        f = state["figures"]
        indices = sample_indices(f.labels, samples, seed)
        roll, per = attention_figures(fig_class, model, preprocess, f, indices, device)
        what = pooling_phrase(model.config.pooling)
        for name, fig, title, caption in (
            ("attention_rollout.png", roll, "Attention rollout",
             f"Where the {what} draws its information from, through all layers "
             "(Abnar & Zuidema 2020: attention averaged over heads, plus the residual, "
             "multiplied across layers). Sample test images, chosen with a fixed seed."),
            ("attention_layers.png", per, "Attention per layer",
             f"Each layer's attention of the {what} to the patches, averaged over heads; "
             "the last column is the rollout."),
        ):
            save_figure(fig, out / name)
            written.append(out / name)
            sections.append((name, title, caption))

    steps.append(("attention", attention))
    bar = tqdm(steps, desc="report", unit="figure", file=sys.stderr, leave=False,
               disable=None if progress is None else not progress)
    for name, step in bar:
        bar.set_postfix_str(name, refresh=True)
        step()
    bar.close()
    index = out / "index.html"
    atomic_write_text(index, _index_html(run_dir, config, state["figures"], weights, sections))
    return [*written, index]
