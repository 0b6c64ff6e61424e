"""Confidence that means something: temperature scaling (Guo et al. 2017) and the
reliability of probabilities.

A network's softmax is not a probability of being right: label smoothing pulls it down
(a clean digit gets about 91 %), and images unlike the training data can get a
confident wrong answer. One temperature T, fitted on held-out images by minimising the
negative log-likelihood of ``softmax(logits / T)``, fixes the scale without changing any
prediction. Training fits it on the validation split, as stored and as augmented (the
run's own augmentation: faint, blurred, low-resolution and re-slanted digits when the
recipe has them), and records it in the run's ``config.json``::

    "calibration": {"temperature": 0.81, "fitted_on": "validation split, ...", ...}

Prediction divides the logits by it and flags a top probability under
``DEFAULT_MIN_CONFIDENCE`` as unsure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config.checks import TEMPERATURE_RANGE
from .predict import energy


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in TEMPERATURE_RANGE that minimises the mean NLL of softmax(logits / T):
    a golden-section search on log T (the NLL is unimodal in it)."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    lo, hi = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):  # the bracket shrinks to 1e-12 of its width
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def reliability(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 10
                ) -> dict[str, Any]:
    """Top-1 confidence against accuracy in ``bins`` equal-width bins, and the expected
    calibration error (Naeini et al. 2015): the bins' |accuracy - confidence| weighted
    by their share of the images."""
    confidence, predicted = probabilities.max(dim=1)
    right = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence.double(), edges[1:-1], right=True)
    rows, ece = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count:
            acc = right[members].mean().item()
            conf = confidence[members].double().mean().item()
            ece += count / len(labels) * abs(acc - conf)
        else:
            acc = conf = None
        rows.append({"low": edges[b].item(), "high": edges[b + 1].item(), "count": count,
                     "accuracy": acc, "confidence": conf})
    return {"bins": rows, "ece": ece, "accuracy": right.mean().item(),
            "mean_confidence": confidence.double().mean().item()}


def calibration_record(logits: torch.Tensor, labels: torch.Tensor,
                       fitted_on: str) -> dict[str, Any]:
    """The "calibration" entry of a run's config.json: the temperature, and the NLL and
    expected calibration error on the data it was fitted on, before and after."""
    t = fit_temperature(logits, labels)
    before, after = logits.float().softmax(dim=1), (logits.float() / t).softmax(dim=1)
    return {"temperature": t, "fitted_on": fitted_on, "images": int(len(labels)),
            "nll_before": F.cross_entropy(logits.double(), labels).item(),
            "nll_after": F.cross_entropy(logits.double() / t, labels).item(),
            "ece_before": reliability(before, labels)["ece"],
            "ece_after": reliability(after, labels)["ece"]}


def fit_thresholds(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                   decline_unknown: float, decline_unsure: float,
                   outlier_logits: torch.Tensor | None = None) -> dict[str, Any]:
    """The thresholds `predict` declines by, fitted on validation logits: "unknown_energy",
    above which a picture is "none of these" (the energy of the ``decline_unknown`` share
    of these images that look least like the classes; only given ``outlier_logits``, the
    held-back outliers, whose declined share is reported), and "unsure_below", the
    calibrated top probability under which an answer is unsure (the ``decline_unsure``
    quantile). Also what they decline of these images, and of their mistakes."""
    e = energy(logits, temperature)
    top = (logits.float() / temperature).softmax(dim=1).max(dim=1).values
    declined = torch.zeros_like(top, dtype=torch.bool)
    record: dict[str, Any] = {}
    if decline_unknown > 0 and outlier_logits is not None and len(outlier_logits):
        tau = float(torch.quantile(e.double(), 1 - decline_unknown))
        record["unknown_energy"] = tau
        record["outliers_declined"] = float(
            (energy(outlier_logits, temperature) > tau).double().mean())
        record["outliers_checked"] = int(len(outlier_logits))
        declined |= e > tau
    if decline_unsure > 0:
        record["unsure_below"] = float(torch.quantile(top.double(), decline_unsure))
        declined |= top < record["unsure_below"]
    wrong = logits.argmax(dim=1) != labels
    record["declined"] = float(declined.double().mean())
    record["mistakes_declined"] = (float((declined & wrong).sum() / wrong.sum())
                                   if wrong.any() else None)
    return record


def fit_on_split(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 preprocess: Any, augment_config: Any, seed: int,
                 device: torch.device, batch_size: int = 1000, bf16: bool = False,
                 outliers: torch.Tensor | None = None, decline_unknown: float = 0.0,
                 decline_unsure: float = 0.0) -> dict[str, Any]:
    """The calibration record of ``model`` fitted on a held-out split (uint8 images): the
    images as stored and, when ``augment_config`` changes images, once more augmented
    by it (seeded), so that the temperature also fits inputs unlike the clean split; then
    the thresholds of ``fit_thresholds`` on the same images (``outliers``: held-back
    pictures of none of the classes, uint8)."""
    from ..data.augment import augment
    from .evaluate import predict_logits

    logits = [predict_logits(model, images, preprocess, batch_size, device, bf16)]
    targets = [labels]
    fitted_on = "the validation split as stored"
    if augment_config.enabled:
        generator = torch.Generator(device=device).manual_seed(seed)
        views = []
        for start in range(0, len(labels), batch_size):
            batch = images[start:start + batch_size].to(device).float().div_(255.0)
            views.append(predict_logits(model, augment(batch, augment_config, generator),
                                        preprocess, batch_size, device, bf16))
        logits.append(torch.cat(views))
        targets.append(labels)
        fitted_on += " and once more with the run's augmentation"
    all_logits, all_labels = torch.cat(logits), torch.cat(targets)
    record = calibration_record(all_logits, all_labels, fitted_on)
    outlier_logits = (predict_logits(model, outliers, preprocess, batch_size, device, bf16)
                      if outliers is not None and len(outliers) else None)
    record["thresholds"] = fit_thresholds(all_logits, all_labels, record["temperature"],
                                          decline_unknown, decline_unsure, outlier_logits)
    return record


def threshold_summary(t: dict[str, Any]) -> str:
    """One line on what the fitted thresholds decline, for the training log."""
    parts = []
    if "unknown_energy" in t:
        parts.append(f"none of these above energy {t['unknown_energy']:.2f} "
                     f"({100 * t['outliers_declined']:.1f} % of {t['outliers_checked']} "
                     "held-back outliers)")
    if "unsure_below" in t:
        parts.append(f"unsure under {100 * t['unsure_below']:.1f} %")
    if not parts:
        return "thresholds: none fitted (unsure under the fixed 50 %)"
    caught = ("" if t["mistakes_declined"] is None
              else f", {100 * t['mistakes_declined']:.0f} % of their mistakes")
    return (f"thresholds: {'; '.join(parts)}: {100 * t['declined']:.1f} % of the validation "
            f"images declined{caught}")


def declining(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              thresholds: dict[str, float]) -> dict[str, Any]:
    """What `predict` would decline of these labelled images, with a run's temperature
    and thresholds (``run_thresholds``): how many as "none of these" and as unsure, and
    how accurate the answered ones are; "coverage" is accuracy against the share answered,
    for every threshold on the calibrated top probability (the report draws it)."""
    from .predict import DEFAULT_MIN_CONFIDENCE, decide

    decisions, _ = decide(logits, temperature,
                          thresholds.get("unsure_below", DEFAULT_MIN_CONFIDENCE),
                          thresholds.get("unknown_energy"))
    answered = torch.tensor([d == "answer" for d in decisions])
    right = logits.argmax(dim=1) == labels
    top = (logits.float() / temperature).softmax(dim=1).max(dim=1).values
    order = top.argsort(descending=True)
    kept = torch.arange(1, len(order) + 1)
    steps = torch.linspace(0, len(order) - 1, min(len(order), 101)).long()
    curve = right[order].double().cumsum(0) / kept
    return {"images": len(decisions),
            "unknown": sum(d == "unknown" for d in decisions),
            "unsure": sum(d == "unsure" for d in decisions),
            "answered_accuracy": (float(right[answered].double().mean())
                                  if answered.any() else None),
            "coverage": [[float(kept[i]) / len(order), float(curve[i])] for i in steps]}


def recalibrate(run_dir: str | Path, decline_unknown: float | None = None,
                decline_unsure: float | None = None, data_dir: str | None = None,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """Fit a finished run's temperature and thresholds again, as training does at its end
    (the same validation split, augmentation, seed and held-back outliers), with other
    shares to decline when given, and record them in its config.json (the train settings
    too, so that the file says how they were fitted). Returns the new calibration."""
    from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, write_json
    from ..config.sections import AugmentConfig, DataConfig, TrainConfig
    from ..data.outliers import load_outliers
    from .evaluate import load_run

    model, config, data = load_run(run_dir, WEIGHTS_NAME, device, data_dir)
    train = {**config["train"]}
    for key, value in (("decline_unknown", decline_unknown), ("decline_unsure", decline_unsure)):
        if value is not None:
            train[key] = value
    cfg = TrainConfig(**train)  # checks the new shares
    data_cfg = DataConfig(**{**config["data"], **({"data_dir": data_dir} if data_dir else {})})
    held = load_outliers(data_cfg, data, cfg.seed)[1] if data_cfg.outliers else None
    calibration = fit_on_split(model, data.val.images, data.val.labels, model.preprocess,
                               AugmentConfig(**config["augment"]), cfg.seed,
                               torch.device(device), cfg.eval_batch_size, outliers=held,
                               decline_unknown=cfg.decline_unknown,
                               decline_unsure=cfg.decline_unsure)
    write_json(Path(run_dir) / CONFIG_NAME, {**config, "train": train,
                                             "calibration": calibration})
    return calibration
