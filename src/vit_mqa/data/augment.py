"""Batched augmentation on tensors, on the training device.

One random geometric transform per image (rotation, isotropic scale, translation and,
where switched on, slant, width and an elastic distortion), applied to the
whole batch with a single ``affine_grid`` + ``grid_sample``; then, where switched on,
what real digits vary in besides their shape (stroke width, a low-resolution round
trip, blur, faint and noisy ink), a random horizontal flip and random erasing (Zhong et
al. 2017), all batched. ``mix_batch`` then applies mixup or CutMix to the batch and its
targets. All randomness comes from an explicit ``torch.Generator`` so that a seed fixes
it and a checkpoint can store its state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config.sections import AugmentConfig


def augment(images: torch.Tensor, config: AugmentConfig,
            generator: torch.Generator) -> torch.Tensor:
    """Float images (B, C, H, W), background 0 -> augmented copies (or the input itself
    when everything is switched off). ``generator`` must live on the images' device.

    Each stage draws from the generator only when it is on, so switching on a later
    stage leaves the earlier stages' draws, and older runs, unchanged."""
    images = random_affine(images, config, generator)
    if config.stroke > 0:
        images = random_stroke(images, config.stroke, generator)
    if config.lowres > 0:
        images = random_lowres(images, config.lowres, generator)
    if config.blur > 0:
        images = random_blur(images, config.blur, generator)
    if config.contrast > 0:
        images = random_contrast(images, config.contrast, generator)
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
    theta = affine_theta(angle, scale, shift_x, shift_y, H, W)
    if config.reshapes:
        # Drawn after the transform above, so that runs without these keep their draws.
        theta = _reshape_matrix(images, config, uniform) @ theta
    displacement = (elastic_displacement(B, H, W, config.elastic, generator, dev, dt)
                    if config.elastic > 0 else None)
    return warp(images, theta, displacement)


def _reshape_matrix(images: torch.Tensor, config: AugmentConfig,
                    uniform: Callable[[float, float], torch.Tensor]) -> torch.Tensor:
    """Per-image (B, 2, 2) matrices, in grid coordinates, that undo a slant (horizontal
    shear) and a change of width: applied after ``affine_theta``'s matrix, the digit is
    slanted and widened in its own frame, before it is rotated, zoomed and shifted."""
    B, _, H, W = images.shape
    shear = torch.zeros(B, device=images.device, dtype=images.dtype)
    width = torch.ones_like(shear)
    if config.slant > 0:
        shear = torch.tan(uniform(-config.slant, config.slant) * (math.pi / 180))
    if config.aspect > 1:
        width = torch.exp(uniform(-math.log(config.aspect), math.log(config.aspect)))
    # x' = width * x + shear * y in pixels; grid x and y are normalised by W and H.
    inverse = torch.zeros(B, 2, 2, device=images.device, dtype=images.dtype)
    inverse[:, 0, 0] = 1 / width
    inverse[:, 0, 1] = -shear * (H / W) / width
    inverse[:, 1, 1] = 1
    return inverse


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussians (B, 2 * radius + 1), one per sigma (B,)."""
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (x[None, :] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _separable_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Blur each image (B, C, H, W) with its own 1-D kernel (B, K) along both axes: one
    grouped convolution per axis for the whole batch."""
    B, C, H, W = x.shape
    k = kernels.repeat_interleave(C, dim=0)[:, None]  # (B * C, 1, K)
    r = kernels.shape[1] // 2
    flat = x.reshape(1, B * C, H, W)
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), k[..., None], groups=B * C)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), k[:, :, None], groups=B * C)
    return flat.reshape(B, C, H, W)


def elastic_displacement(batch: int, height: int, width: int, alpha: float,
                         generator: torch.Generator, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
    """Smooth random displacement fields for ``affine_grid``'s grids, (B, H, W, 2) in grid
    units: uniform noise in [-1, 1] on a coarse grid of cells 7 px wide (at 28 px; scaled
    with the image), enlarged bicubically, times a strength drawn per image uniformly in
    [0, alpha] px. Simard et al.'s (2003) elastic distortion, with their Gaussian smoothing
    (sigma 4 px) replaced by interpolation, 6x cheaper on a CPU: at full strength 3 moves
    pixels by 1.6 px (standard deviation), their strength 34 by about 1.4 px."""
    cell = 7.0 * min(height, width) / 28
    coarse = (max(2, math.ceil(height / cell)), max(2, math.ceil(width / cell)))
    noise = torch.rand(batch, 2, *coarse, generator=generator, device=device,
                       dtype=dtype) * 2 - 1
    strength = torch.rand(batch, generator=generator, device=device, dtype=dtype) * alpha
    field = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)
    field = field * strength[:, None, None, None]
    # Pixels to grid units: the image spans 2 units over W (x) and H (y) pixels.
    scale = torch.tensor([2.0 / width, 2.0 / height], device=device, dtype=dtype)
    return field.permute(0, 2, 3, 1) * scale


def _restretch(x: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """What the MNIST procedure does to a soft digit, for the images ``changed`` (B,):
    its strokes' core stretched to white (85 % of the brightest pixel) and anything under
    a fifth of that to black."""
    top = x.flatten(1).amax(dim=1).clamp(min=1e-6)[:, None, None, None]
    stretched = ((x - 0.17 * top) / (0.68 * top)).clamp(0, 1)
    return torch.where(changed[:, None, None, None], stretched, x)


def random_stroke(images: torch.Tensor, amount: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Thicker or thinner strokes (a marker, a fine pen): each image's stroke width
    changes by a uniform amount in [-amount, amount] px, by grey dilation or erosion
    with a 3x3 square (each step moves both edges of a stroke by a pixel), blending
    between whole steps for the fraction."""
    B = images.shape[0]
    change = (torch.rand(B, generator=generator, device=images.device, dtype=images.dtype)
              * 2 - 1) * (amount / 2)  # in steps: one step widens a stroke by 2 px
    steps = math.ceil(amount / 2)
    levels = [images]
    grown, shrunk = images, images
    for _ in range(steps):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        shrunk = -F.max_pool2d(-shrunk, 3, stride=1, padding=1)
        levels = [shrunk, *levels, grown]
    stack = torch.stack(levels, dim=1)  # (B, 2 * steps + 1, C, H, W): level i = i - steps
    pos = change + steps
    low = pos.floor().long().clamp(0, 2 * steps)
    high = (low + 1).clamp(max=2 * steps)
    index = torch.arange(B, device=images.device)
    out = torch.lerp(stack[index, low], stack[index, high], (pos - low)[:, None, None, None])
    # Erosion dims thin strokes: bring the brightest pixel back to where it was.
    top = images.flatten(1).amax(dim=1)[:, None, None, None]
    now = out.flatten(1).amax(dim=1).clamp(min=1e-6)[:, None, None, None]
    return (out * (top / now)).clamp(0, 1)


def random_lowres(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability p per image, a low-resolution round trip: the image reduced
    (area averaging) so that MNIST's 20 px digit box becomes 7 to 16 px, its grey levels
    cut to 17 (a scan in 4x4 blocks counts 0-16 pixels), then enlarged bicubically back
    and stretched as the MNIST procedure would (a digit scanned small and upscaled)."""
    B, _, H, W = images.shape
    dev = images.device
    chosen = torch.rand(B, generator=generator, device=dev) < p
    box = torch.rand(B, generator=generator, device=dev) * 9 + 7  # digit box, px
    sides = (box * min(H, W) / 20).round().long()
    out = images.clone()
    for side in sides[chosen].unique().tolist():
        index = (chosen & (sides == side)).nonzero().squeeze(1)
        small = F.interpolate(images[index], size=(max(2, round(side * H / min(H, W))),
                                                   max(2, round(side * W / min(H, W)))),
                              mode="area")
        small = (small * 16).round() / 16
        out[index] = F.interpolate(small, size=(H, W), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
    return _restretch(out, chosen)


def random_blur(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian blur per image, its sigma uniform in [0, sigma] px (out of focus, a soft
    pencil), then stretched as the MNIST procedure would."""
    B = images.shape[0]
    sigmas = torch.rand(B, generator=generator, device=images.device,
                        dtype=images.dtype) * sigma
    radius = max(1, math.ceil(3 * sigma))
    blurred = _separable_blur(images, _gaussian_kernels(sigmas, radius))
    return _restretch(blurred, sigmas > 0.3)


def random_contrast(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """With probability p per image, faint, grey and noisy ink: a gamma in [0.5, 2]
    (log-uniform) on the grey levels, the brightest level scaled to 0.5-1, and Gaussian
    pixel noise of sigma up to 0.08, clipped to [0, 1]."""
    B = images.shape[0]
    dev, dt = images.device, images.dtype

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(B, generator=generator, device=dev, dtype=dt) * (high - low)
                + low)[:, None, None, None]

    chosen = (torch.rand(B, generator=generator, device=dev) < p)[:, None, None, None]
    gamma = torch.exp(uniform(math.log(0.5), math.log(2.0)))
    level = uniform(0.5, 1.0)
    noise = torch.randn(images.shape, generator=generator, device=dev, dtype=dt) * uniform(0, 0.08)
    changed = (images.clamp(min=0) ** gamma * level + noise).clamp(0, 1)
    return torch.where(chosen, changed, images)


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


def warp(images: torch.Tensor, theta: torch.Tensor,
         displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample images (B, C, H, W) through affine matrices (B, 2, 3), plus a per-pixel
    ``displacement`` of the sampling grid (B, H, W, 2) when given; outside is 0."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement
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
