"""Batched augmentation on tensors, on the training device.

One random affine transform per image (rotation, isotropic scale, translation),
applied to the whole batch with a single ``affine_grid`` + ``grid_sample``; then,
where switched on, a random horizontal flip and random erasing (Zhong et al. 2017),
both as whole-batch masks. ``mix_batch`` then applies mixup or CutMix to the batch and
its targets. All randomness comes from an explicit ``torch.Generator`` so that a seed
fixes it and a checkpoint can store its state.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from .config import AugmentConfig


def augment(images: torch.Tensor, config: AugmentConfig,
            generator: torch.Generator) -> torch.Tensor:
    """Float images (B, C, H, W), background 0 -> augmented copies (or the input itself
    when everything is switched off). ``generator`` must live on the images' device.

    Each stage draws from the generator only when it is on, so switching on a later
    stage leaves the earlier stages' draws, and older runs, unchanged."""
    images = random_affine(images, config, generator)
    if config.hflip > 0:
        images = random_hflip(images, config.hflip, generator)
    if config.erase > 0:
        images = random_erase(images, config, generator)
    return images


def random_hflip(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_erase(images: torch.Tensor, config: AugmentConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """With probability ``config.erase`` per image, set one random rectangle to 0: its
    area a uniform share of the image, its aspect ratio log-uniform, its place uniform."""
    B, _, H, W = images.shape
    dev = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(B, generator=generator, device=dev) * (high - low) + low

    chosen = uniform(0, 1) < config.erase
    area = uniform(config.erase_min_area, config.erase_max_area) * (H * W)
    log_ratio = math.log(config.erase_ratio)
    ratio = torch.exp(uniform(-log_ratio, log_ratio))
    h = torch.sqrt(area * ratio).round().clamp(1, H)
    w = torch.sqrt(area / ratio).round().clamp(1, W)
    top = (uniform(0, 1) * (H - h + 1)).floor()
    left = (uniform(0, 1) * (W - w + 1)).floor()
    rows = torch.arange(H, device=dev)[None, :]
    cols = torch.arange(W, device=dev)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]
    return images.masked_fill(mask[:, None], 0.0)


def random_affine(images: torch.Tensor, config: AugmentConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Float images (B, C, H, W), background 0 -> randomly rotated, scaled, shifted copies.

    ``generator`` must live on the images' device.
    """
    if not config.affine:
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


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
              config: AugmentConfig, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a batch with itself reversed, as in timm's batch mode: one weight
    per batch, drawn from Beta(alpha, alpha). Returns the images and soft targets (B,
    num_classes) that weigh each image's two labels by its share of the blend (CutMix: of
    the pixels, after the box is clipped to the image)."""
    targets = F.one_hot(labels, num_classes).float()
    if not config.mixes:
        return images, targets
    # One draw from the batch's generator seeds this batch's choices: Beta sampling has no
    # torch.Generator argument, and the decisions are a handful of scalars.
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
    rng = random.Random(int(seed))
    if rng.random() >= config.mix_prob:
        return images, targets
    partner = images.flip(0)
    if config.cutmix > 0 and (config.mixup == 0 or rng.random() < 0.5):
        H, W = images.shape[-2:]
        side = math.sqrt(1.0 - rng.betavariate(config.cutmix, config.cutmix))
        h, w = round(H * side), round(W * side)
        cy, cx = rng.randrange(H), rng.randrange(W)
        top, bottom = max(cy - h // 2, 0), min(cy + h - h // 2, H)
        left, right = max(cx - w // 2, 0), min(cx + w - w // 2, W)
        images = images.clone()
        images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        weight = 1.0 - (bottom - top) * (right - left) / (H * W)
    else:
        weight = rng.betavariate(config.mixup, config.mixup)
        images = torch.lerp(partner, images, weight)
    return images, torch.lerp(targets.flip(0), targets, weight)
