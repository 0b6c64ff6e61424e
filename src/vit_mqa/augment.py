"""Batched augmentation on tensors, on the training device.

One random affine transform per image (rotation, isotropic scale, translation),
applied to the whole batch with a single ``affine_grid`` + ``grid_sample``. All
randomness comes from an explicit ``torch.Generator`` so that a seed fixes it and
a checkpoint can store its state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import VitMqaError


@dataclass
class AugmentConfig:
    """The "augment" part of config.json; all zeros/ones switches it off."""

    rotate: float = 10.0  # max rotation, degrees, uniform in [-rotate, rotate]
    scale_min: float = 0.9  # isotropic zoom, uniform in [scale_min, scale_max]
    scale_max: float = 1.1
    translate: float = 0.1  # max shift as a fraction of height / width

    def validate(self) -> None:
        if self.rotate < 0 or self.translate < 0:
            raise VitMqaError("rotate and translate must be >= 0")
        if not 0 < self.scale_min <= self.scale_max:
            raise VitMqaError(
                f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}"
            )

    @property
    def enabled(self) -> bool:
        return self.rotate > 0 or self.translate > 0 or self.scale_min != 1 or self.scale_max != 1


def random_affine(images: torch.Tensor, config: AugmentConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Float images (B, C, H, W), background 0 -> randomly rotated, scaled, shifted copies.

    ``generator`` must live on the images' device.
    """
    if not config.enabled:
        return images
    B, _, H, W = images.shape
    dev, dt = images.device, images.dtype

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(B, generator=generator, device=dev, dtype=dt) * (high - low) + low

    angle = uniform(-config.rotate, config.rotate) * (math.pi / 180)
    scale = uniform(config.scale_min, config.scale_max)
    shift_x = uniform(-config.translate, config.translate) * 2  # grid units span [-1, 1]
    shift_y = uniform(-config.translate, config.translate) * 2
    return warp(images, affine_theta(angle, scale, shift_x, shift_y, H, W))


def affine_theta(angle: torch.Tensor, scale: torch.Tensor, shift_x: torch.Tensor,
                 shift_y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-image (B, 2, 3) matrices for ``affine_grid``: rotate by angle (radians), zoom by
    scale, then shift (in grid units, where the image spans [-1, 1])."""
    # affine_grid maps output to input coordinates: input = R(-angle) / scale @ (out - shift).
    # Grid coordinates are normalised per axis, so the rotation is conjugated by the aspect
    # ratio to stay a true rotation on non-square images.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    a, b = cos, sin * (height / width)
    c, d = -sin * (width / height), cos
    return torch.stack([
        torch.stack([a, b, -(a * shift_x + b * shift_y)], dim=1),
        torch.stack([c, d, -(c * shift_x + d * shift_y)], dim=1),
    ], dim=1)


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample images (B, C, H, W) through affine matrices (B, 2, 3); outside is 0."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
