"""Prediction on image files, with the preprocessing saved in the run's config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import WEIGHTS_NAME, load_model_dir
from .data import Preprocess, list_images, read_image
from .errors import VitMqaError


class Predictor:
    """Top-k classification of image files (any size or mode Pillow reads).

    >>> predictor = Predictor("runs/mnist-fast")            # doctest: +SKIP
    >>> predictor.predict(["digit.png"], top_k=3)           # doctest: +SKIP
    [{'path': 'digit.png', 'top': [{'class': '7', 'index': 7, 'probability': 0.98}, ...]}]
    """

    def __init__(self, run_dir: str | Path, device: str | torch.device = "cpu",
                 weights: str = WEIGHTS_NAME, batch_size: int = 256) -> None:
        self.device = torch.device(device)
        self.model, config = load_model_dir(run_dir, weights, self.device)
        mc = self.model.config
        if "preprocess" in config:
            try:
                self.preprocess = Preprocess.from_dict(config["preprocess"])
            except (KeyError, TypeError, ValueError) as e:
                raise VitMqaError(f"{run_dir}: malformed \"preprocess\" in config.json "
                                  f"({e!r})") from None
        else:  # a bare save_pretrained directory: plain [-1, 1] scaling
            self.preprocess = Preprocess(mc.image_size, mc.in_channels,
                                         (0.5,) * mc.in_channels, (0.5,) * mc.in_channels)
        self.classes: list[str] = config.get("classes") or [str(i) for i in range(mc.num_classes)]
        if len(self.classes) != mc.num_classes:
            raise VitMqaError(f"{run_dir}: config lists {len(self.classes)} classes "
                              f"but the model has {mc.num_classes} outputs")
        self.batch_size = batch_size

    def load(self, paths: Sequence[str | Path]) -> tuple[list[Path], torch.Tensor]:
        """Image files (folders searched recursively) -> uint8 batch (N, C, H, W)."""
        files = list_images(paths)
        if not files:
            raise VitMqaError("no image files found in " + ", ".join(map(str, paths)))
        p = self.preprocess
        return files, torch.stack([read_image(f, p.image_size, p.in_channels) for f in files])

    @torch.inference_mode()
    def probabilities(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) at the model's size -> class probabilities (N, classes)."""
        out = []
        for start in range(0, images_uint8.shape[0], self.batch_size):
            batch = self.preprocess(images_uint8[start:start + self.batch_size].to(self.device))
            out.append(self.model(batch).float().softmax(dim=-1).cpu())
        return torch.cat(out)

    def predict(self, paths: Sequence[str | Path], top_k: int = 5) -> list[dict[str, Any]]:
        files, images = self.load(paths)
        probs = self.probabilities(images)
        k = max(1, min(top_k, len(self.classes)))
        values, indices = probs.topk(k, dim=-1)
        return [
            {"path": str(f),
             "top": [{"class": self.classes[i], "index": int(i), "probability": float(v)}
                     for v, i in zip(vs.tolist(), ix.tolist())]}
            for f, vs, ix in zip(files, values, indices)
        ]
