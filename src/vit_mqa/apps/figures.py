"""The figures of ``vit-mqa report``, drawn with matplotlib (imported only here, when a
figure is drawn): training curves, confusion matrix, per-class accuracy, reliability, the
most confident mistakes, and attention over sample test images."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..data.preprocess import Preprocess
from ..errors import VitMqaError
from ..evaluation.calibration import reliability
from ..evaluation.explain import model_relevance, overlay

DPI = 110
DISPLAY_SIDE = 112  # small images are enlarged (nearest) to about this before overlaying


def figure_class() -> type:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise VitMqaError("report needs matplotlib: pip install 'vit-mqa[report]'") from None
    return Figure


def save_figure(fig: Any, path: Path) -> None:
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


def plot_coverage(fig_class: type, declined: dict[str, Any]) -> Any:
    """Accuracy against coverage on the test split: the answers kept, most confident first,
    and the point where the run's thresholds stand (``calibration.declining``)."""
    share, accuracy = zip(*declined["coverage"])
    fig = fig_class(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot([100 * s for s in share], [100 * a for a in accuracy], color="#4477aa")
    kept = 1 - (declined["unknown"] + declined["unsure"]) / declined["images"]
    if declined["answered_accuracy"] is not None:
        ax.plot([100 * kept], [100 * declined["answered_accuracy"]], "o", color="#cc6677",
                label=f"the run's thresholds: {declined['unknown']} none of these, "
                      f"{declined['unsure']} unsure")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("test images answered (%), most confident first")
    ax.set_ylabel("accuracy of the answered (%)")
    ax.set_title("Accuracy against coverage (test split)")
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


def pooling_phrase(pooling: str) -> str:
    return {"cls": "CLS token", "mean": "mean-pooled output (all tokens' rows averaged)",
            "seq": "sequence-pooled output (the tokens' rows weighted by the learned "
                   "pooling weights)"}[pooling]


def attention_figures(fig_class: type, model: torch.nn.Module, preprocess: Preprocess,
                      f: Figures, indices: list[int], device: torch.device
                      ) -> tuple[Any, Any]:
    """(rollout figure, per-layer figure) for the test images at ``indices``."""
    c = model.config
    x = preprocess(f.images[indices].to(device))
    rolled, layers = (t.cpu() for t in model_relevance(model, x))
    shown = [_display(f.images[i]) for i in indices]
    titles = []
    for i in indices:
        p = f.probabilities[i]
        pred = int(p.argmax())
        titles.append((f"true {f.classes[int(f.labels[i])]}",
                       f"pred {f.classes[pred]} ({100 * p[pred]:.0f}%)",
                       pred == int(f.labels[i])))
    what = pooling_phrase(c.pooling)

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
    roll.suptitle(f"Attention rollout of the {what}, {len(layers)} layers")

    cols = len(layers) + 2
    per = fig_class(figsize=(1.35 * cols, 1.45 * n + 0.9), layout="constrained")
    axes = np.atleast_1d(per.subplots(n, cols)).reshape(n, cols)
    for k in range(n):
        true, pred, right = titles[k]
        _show(axes[k, 0], shown[k], "input" if k == 0 else None)
        axes[k, 0].set_ylabel(f"{true}\n{pred}", fontsize=8,
                              color="black" if right else "#aa3333")
        for layer in range(len(layers)):
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
