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
chosen with a fixed seed, so a report is reproducible. Needs matplotlib
(``pip install 'vit-mqa[report]'``), imported only here.
"""

from __future__ import annotations

import html
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .calibration import reliability, run_temperature
from .checkpoint import METRICS_NAME, WEIGHTS_NAME, atomic_write, atomic_write_text
from .data import Split
from .distributed import pick_device
from .errors import VitMqaError
from .evaluate import classification_report, evaluate, load_run
from .explain import attention_rollout, layer_attention, overlay, readout
from .preprocess import Preprocess

REPORT_DIR = "report"
DPI = 110
DISPLAY_SIDE = 112  # small images are enlarged (nearest) to about this before overlaying


def _figure_class() -> type:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise VitMqaError("report needs matplotlib: pip install 'vit-mqa[report]'") from None
    return Figure


def _save(fig: Any, path: Path) -> None:
    # The temporary name has no .png suffix, so the format is named.
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, facecolor="white"))


@dataclass
class Figures:
    """The run's data that the figures are drawn from."""

    run_name: str
    classes: list[str]
    images: torch.Tensor  # uint8 (N, C, H, W), the test split
    labels: torch.Tensor  # (N,)
    probabilities: torch.Tensor  # (N, classes)
    report: dict[str, Any]  # classification_report plus "loss"
    metrics: list[dict[str, Any]]  # metrics.jsonl lines


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


def _display(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> (H', W') or (H', W', 3), enlarged by a whole factor (nearest)."""
    a = image.cpu().numpy()
    a = a[0] if a.shape[0] == 1 else a[:3].transpose(1, 2, 0)
    k = max(1, math.ceil(DISPLAY_SIDE / max(a.shape[:2])))
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def _show(ax: Any, image: np.ndarray, title: str | None = None, color: str = "black") -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9, color=color)


def plot_curves(fig_class: type, metrics: list[dict[str, Any]], run_name: str) -> Any:
    fig = fig_class(figsize=(13, 3.9), layout="constrained")
    axes = fig.subplots(1, 3)
    epochs = [r["epoch"] for r in metrics]

    def series(key: str) -> list[float] | None:
        values = [r.get(key) for r in metrics]
        return None if any(v is None for v in values) else values

    from matplotlib.ticker import MaxNLocator, PercentFormatter

    panels = [
        (axes[0], "loss", [("train_loss", "train (augmented, smoothed labels)"),
                           ("val_loss", "validation")], 1.0),
        (axes[1], "accuracy", [("train_accuracy", "train (augmented)"),
                               ("val_accuracy", "validation")], 100.0),
        (axes[2], "learning rate", [("lr", "at the end of the epoch")], 1.0),
    ]
    for ax, name, keys, scale in panels:
        drawn = False
        for key, label in keys:
            values = series(key)
            if values is not None:
                ax.plot(epochs, [v * scale for v in values], marker="o", markersize=3,
                        label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    axes[1].yaxis.set_major_formatter(PercentFormatter(decimals=1))
    val = series("val_accuracy")
    if val:
        best = int(np.argmax(val))
        axes[1].plot([epochs[best]], [100 * val[best]], marker="*", markersize=11,
                     linestyle="none", color="#cc6677",
                     label=f"best validation {100 * val[best]:.2f}% (epoch {epochs[best]})")
        axes[1].legend(fontsize=8)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.suptitle(f"Training curves of run {run_name}")
    return fig


def plot_confusion(fig_class: type, report: dict[str, Any], classes: list[str]) -> Any:
    from matplotlib.colors import PowerNorm

    matrix = np.asarray(report["confusion_matrix"], dtype=np.float64)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(max(5.0, 0.55 * n + 2), 16)
    fig = fig_class(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    # A power norm keeps the few off-diagonal errors visible beside a dominant diagonal.
    im = ax.imshow(rows, cmap="Blues", norm=PowerNorm(gamma=0.35, vmin=0, vmax=1))
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                            fontsize=8, color="white" if rows[i, j] > 0.4 else "black")
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 2 else 0,
                  ha="right" if max(map(len, classes)) > 2 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_title(f"Confusion matrix (test, {report['num_images']} images, "
                 f"accuracy {100 * report['accuracy']:.2f}%)")
    return fig


def plot_per_class(fig_class: type, report: dict[str, Any], classes: list[str]) -> Any:
    accs = [report["per_class"][c]["accuracy"] for c in classes]
    values = [100 * a if a is not None else 0.0 for a in accs]
    fig = fig_class(figsize=(max(6.0, 0.6 * len(classes) + 2), 4), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(classes)), values, color="#4477aa")
    present = [v for v, a in zip(values, accs) if a is not None]
    low = min(present) if present else 0.0
    # Zoom in on the range the bars differ in; from 0 they would all look full.
    ax.set_ylim(max(0.0, low - max(2.0, (100 - low) * 0.5)), 100.5)
    for bar, a in zip(bars, accs):
        text = "n/a" if a is None else f"{100 * a:.1f}"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
    overall = 100 * report["accuracy"]
    ax.axhline(overall, color="#cc6677", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(classes)), classes,
                  rotation=45 if max(map(len, classes)) > 2 else 0,
                  ha="right" if max(map(len, classes)) > 2 else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("true class")
    ax.set_title(f"Per-class accuracy (test; overall {overall:.2f}%, dashed)")
    return fig


def plot_reliability(fig_class: type, logits: torch.Tensor, labels: torch.Tensor,
                     temperature: float) -> Any:
    """Reliability diagram of the test split: accuracy against top-1 confidence in ten
    bins, as trained (softmax of the logits) and calibrated (logits / temperature), with
    each one's expected calibration error; below, how many images fall in each bin."""
    raw = reliability(logits.float().softmax(dim=1), labels)
    calibrated = reliability((logits.float() / temperature).softmax(dim=1), labels)
    fig = fig_class(figsize=(6.5, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
    for record, label, color, marker in (
            (raw, "as trained", "#cc6677", "o"),
            (calibrated, f"temperature {temperature:.2f}", "#4477aa", "s")):
        rows = [b for b in record["bins"] if b["count"]]
        top.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows],
                 marker=marker, color=color, label=f"{label}: ECE {100 * record['ece']:.2f} %")
        bottom.plot([(b["low"] + b["high"]) / 2 for b in record["bins"]],
                    [max(b["count"], 0.5) for b in record["bins"]], marker=marker,
                    color=color)
    top.set_ylabel("accuracy in the bin")
    top.set_title("Reliability (test split): a calibrated model lies on the diagonal")
    top.legend(loc="upper left", fontsize=8)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    bottom.set_yscale("log")
    bottom.set_ylabel("images")
    bottom.set_xlabel("top-1 probability")
    return fig


def confident_mistakes(probabilities: torch.Tensor, labels: torch.Tensor,
                       count: int) -> torch.Tensor:
    """Indices of the ``count`` wrong predictions made with the highest probability
    (ties: lower index first)."""
    confidence, predicted = probabilities.max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    order = torch.sort(confidence[wrong], descending=True, stable=True).indices
    return wrong[order[:count]]


def plot_mistakes(fig_class: type, f: Figures, count: int = 24, columns: int = 8) -> Any:
    idx = confident_mistakes(f.probabilities, f.labels, count)
    rows = max(1, math.ceil(len(idx) / columns))
    fig = fig_class(figsize=(1.55 * columns, 1.85 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).reshape(rows, columns)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx.tolist()):
        p = f.probabilities[i]
        pred = int(p.argmax())
        _show(ax, _display(f.images[i]),
              f"true {f.classes[int(f.labels[i])]}\npred {f.classes[pred]} ({100 * p[pred]:.0f}%)",
              color="#aa3333")
        ax.axis("on")
    if len(idx) == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center",
                          transform=axes.flat[0].transAxes)
    fig.suptitle(f"Most confident mistakes on the test split ({len(idx)} of "
                 f"{int((f.probabilities.argmax(dim=1) != f.labels).sum())} errors)")
    return fig


def sample_indices(labels: torch.Tensor, count: int, seed: int = 0) -> list[int]:
    """``count`` test images in a seeded random order, one per class first (so the figure
    shows many classes), then in class order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    for i in order:
        if int(labels[i]) not in seen:
            seen.add(int(labels[i]))
            chosen.append(i)
            if len(chosen) == count:
                break
    rest = iter(i for i in order if i not in set(chosen))
    while len(chosen) < min(count, len(labels)):
        chosen.append(next(rest))
    return sorted(chosen, key=lambda i: (int(labels[i]), i))


def _pooling_phrase(pooling: str) -> str:
    return {"cls": "CLS token", "mean": "mean-pooled output (all tokens' rows averaged)",
            "seq": "sequence-pooled output (the tokens' rows weighted by the learned "
                   "pooling weights)"}[pooling]


def attention_figures(fig_class: type, model: torch.nn.Module, preprocess: Preprocess,
                      f: Figures, indices: list[int], device: torch.device
                      ) -> tuple[Any, Any]:
    """(rollout figure, per-layer figure) for the test images at ``indices``."""
    c = model.config
    x = preprocess(f.images[indices].to(device))
    maps = model.attention_maps(x)
    gh, gw = c.grid_size
    pooling = readout(model, x)
    rolled = attention_rollout(maps, c.num_prefix_tokens, pooling).reshape(-1, gh, gw).cpu()
    layers = layer_attention(maps, c.num_prefix_tokens, pooling).reshape(
        len(maps), -1, gh, gw).cpu()
    shown = [_display(f.images[i]) for i in indices]
    titles = []
    for i in indices:
        p = f.probabilities[i]
        pred = int(p.argmax())
        titles.append((f"true {f.classes[int(f.labels[i])]}",
                       f"pred {f.classes[pred]} ({100 * p[pred]:.0f}%)",
                       pred == int(f.labels[i])))
    what = _pooling_phrase(c.pooling)

    n = len(indices)
    roll = fig_class(figsize=(1.6 * n, 4.0), layout="constrained")
    axes = np.atleast_1d(roll.subplots(2, n)).reshape(2, n)
    for k in range(n):
        true, pred, right = titles[k]
        _show(axes[0, k], shown[k], true)
        _show(axes[1, k], overlay(shown[k], rolled[k]), pred,
              color="black" if right else "#aa3333")
    axes[0, 0].set_ylabel("input", fontsize=9)
    axes[1, 0].set_ylabel("rollout", fontsize=9)
    _heat_colorbar(roll, axes[1, :].tolist())
    roll.suptitle(f"Attention rollout of the {what}, {len(maps)} layers")

    cols = len(maps) + 2
    per = fig_class(figsize=(1.35 * cols, 1.45 * n + 0.9), layout="constrained")
    axes = np.atleast_1d(per.subplots(n, cols)).reshape(n, cols)
    for k in range(n):
        true, pred, right = titles[k]
        _show(axes[k, 0], shown[k], "input" if k == 0 else None)
        axes[k, 0].set_ylabel(f"{true}\n{pred}", fontsize=8,
                              color="black" if right else "#aa3333")
        for layer in range(len(maps)):
            _show(axes[k, layer + 1], overlay(shown[k], layers[layer, k]),
                  f"layer {layer + 1}" if k == 0 else None)
        _show(axes[k, -1], overlay(shown[k], rolled[k]), "rollout" if k == 0 else None)
    _heat_colorbar(per, axes[-1, 1:].tolist())
    per.suptitle(f"Attention of the {what} in each layer (mean over heads), and rolled out")
    return roll, per


def _heat_colorbar(fig: Any, axes: list[Any]) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="inferno"), ax=axes,
                       location="bottom", shrink=0.5, aspect=40, pad=0.02)
    bar.set_ticks([0, 1], labels=["low", "high"])
    bar.set_label("attention, scaled per panel", fontsize=8)
    bar.ax.tick_params(labelsize=8)


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
    fig_class = _figure_class()  # before any slow work: a missing extra fails at once
    run_dir = Path(run_dir)
    device = pick_device(device) if isinstance(device, str) else device
    model, config, data = load_run(run_dir, weights, device, data_dir)
    metrics = read_metrics(run_dir)
    out = run_dir / REPORT_DIR
    split: Split = data.test
    preprocess = Preprocess.from_dict(config["preprocess"])

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
            _save(draw(), out / name)
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
    emit("mistakes.png", "Most confident mistakes",
         "Wrong test predictions with the highest predicted probability.",
         lambda: plot_mistakes(fig_class, state["figures"], mistakes))

    def attention() -> None:
        f = state["figures"]
        indices = sample_indices(f.labels, samples, seed)
        roll, per = attention_figures(fig_class, model, preprocess, f, indices, device)
        what = _pooling_phrase(model.config.pooling)
        for name, fig, title, caption in (
            ("attention_rollout.png", roll, "Attention rollout",
             f"Where the {what} draws its information from, through all layers "
             "(Abnar & Zuidema 2020: attention averaged over heads, plus the residual, "
             "multiplied across layers). Sample test images, chosen with a fixed seed."),
            ("attention_layers.png", per, "Attention per layer",
             f"Each layer's attention of the {what} to the patches, averaged over heads; "
             "the last column is the rollout."),
        ):
            _save(fig, out / name)
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
