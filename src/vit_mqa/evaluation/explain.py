"""Where the model looks: attention rollout, per-layer attention, and heat-map overlays.

Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in
Transformers") follows attention through the residual stream: each layer's map is
averaged over heads, the identity is added for the skip connection, rows are
renormalised, and the layers are multiplied from the first to the last. The row of
the token that the head reads gives each patch's relevance: the CLS token's row for
CLS pooling, the average of all rows for mean pooling (the pooled output is the
mean of the tokens, so its relevance is the mean of theirs), and for sequence pooling
the rows weighted as the model weights the tokens of that image.

Maps come from ``VisionTransformer.attention_maps(x)``: a list of (B, heads, N, N)
probabilities, one per layer. Everything here is plain torch / numpy, so importing
it needs no plotting library.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import VitMqaError

POOLINGS = ("cls", "mean")
# What the pooled output reads: "cls", "mean", or each token's weight (B, N).
Readout = str | torch.Tensor


def _check(maps: Sequence[torch.Tensor], num_prefix_tokens: int, pooling: Readout) -> None:
    if isinstance(pooling, str) and pooling not in POOLINGS:
        raise VitMqaError(f"pooling must be 'cls', 'mean' or the tokens' pooling weights "
                          f"(B, N) (for sequence pooling: `readout(model, x)`), got {pooling!r}")
    if not maps:
        raise VitMqaError("no attention maps given (the model has no layers?)")
    shape = maps[0].shape
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise VitMqaError(f"attention maps must be (B, heads, N, N), got {tuple(shape)}")
    if any(m.shape != shape for m in maps):
        raise VitMqaError("attention maps of different shapes: "
                          f"{sorted({tuple(m.shape) for m in maps})}")
    if not isinstance(pooling, str) and tuple(pooling.shape) != (shape[0], shape[-1]):
        raise VitMqaError(f"pooling weights must be (B, N) = ({shape[0]}, {shape[-1]}) for "
                          f"these maps, got {tuple(pooling.shape)}")
    if isinstance(pooling, str) and pooling == "cls" and num_prefix_tokens < 1:
        raise VitMqaError("CLS pooling needs a prefix (CLS) token: num_prefix_tokens >= 1")
    if not 0 <= num_prefix_tokens < shape[-1]:
        raise VitMqaError(f"num_prefix_tokens {num_prefix_tokens} leaves no patch tokens "
                          f"among {shape[-1]}")


def _read_out(matrix: torch.Tensor, num_prefix_tokens: int, pooling: Readout) -> torch.Tensor:
    """(B, N, N) token-to-token matrix -> (B, patches): the pooled output's row."""
    if isinstance(pooling, str):
        row = matrix[:, 0] if pooling == "cls" else matrix.mean(dim=1)
    else:  # each token's row, weighted by its share of the pooled output
        row = (pooling.to(matrix).unsqueeze(1) @ matrix).squeeze(1)
    return row[:, num_prefix_tokens:]


@torch.no_grad()
def readout(model: torch.nn.Module, x: torch.Tensor) -> Readout:
    """What the rollout reads for ``model`` (a ``VisionTransformer``) on normalised images
    x: its pooling's name, or for sequence pooling the weights (B, N) it gives x's tokens
    (one more forward pass, in eval mode; every module's mode is restored after it)."""
    if model.config.pooling in POOLINGS:
        return model.config.pooling
    modes = {m: m.training for m in model.modules()}
    try:
        return model.eval().pooling_weights(model.forward_features(x))
    finally:
        for m, training in modes.items():
            m.training = training


def attention_rollout(maps: Sequence[torch.Tensor], num_prefix_tokens: int,
                      pooling: Readout) -> torch.Tensor:
    """Rolled-out relevance of each patch for the pooled output, (B, grid_h * grid_w).

    ``maps`` are per-layer attention probabilities (B, heads, N, N), first layer first;
    ``pooling`` is "cls", "mean" or the tokens' pooling weights (B, N). Values are the
    rollout matrix's entries, not rescaled: for CLS pooling they are the
    share of the CLS token's flow that reaches each patch (the rest stays on CLS).
    """
    _check(maps, num_prefix_tokens, pooling)
    n = maps[0].shape[-1]
    # float64: products of many row-stochastic matrices lose nothing visible in float32,
    # but the maps may come from bf16 autocast.
    eye = torch.eye(n, dtype=torch.float64, device=maps[0].device)
    rollout = eye.expand(maps[0].shape[0], n, n)
    for attn in maps:
        a = attn.detach().to(torch.float64).mean(dim=1) + eye  # the residual path
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout  # later layers act on the output of earlier ones
    return _read_out(rollout, num_prefix_tokens, pooling).float()


def layer_attention(maps: Sequence[torch.Tensor], num_prefix_tokens: int,
                    pooling: Readout) -> torch.Tensor:
    """Each layer's head-averaged attention from the pooled token(s) to the patches,
    (layers, B, grid_h * grid_w): the CLS row for CLS pooling, the mean row for mean, the
    rows weighted by the pooling weights for sequence pooling."""
    _check(maps, num_prefix_tokens, pooling)
    return torch.stack([
        _read_out(attn.detach().float().mean(dim=1), num_prefix_tokens, pooling)
        for attn in maps
    ])


@torch.no_grad()
def model_relevance(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images x (B, C, H, W) for a ``VisionTransformer`` ->
    (rollout (B, grid_h, grid_w), per-layer attention (layers, B, grid_h, grid_w))."""
    c = model.config
    maps = model.attention_maps(x)
    gh, gw = c.grid_size
    pooling = readout(model, x)
    rolled = attention_rollout(maps, c.num_prefix_tokens, pooling)
    layers = layer_attention(maps, c.num_prefix_tokens, pooling)
    return rolled.reshape(-1, gh, gw), layers.reshape(len(maps), -1, gh, gw)


# A perceptually ordered dark-to-bright map (anchors sampled from matplotlib's "inferno"),
# so heat reads as brightness in greyscale prints too.
_INFERNO = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99],
    [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164],
], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3), dark (0) to bright (1)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    pos = v * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (pos - lo)[..., None]
    rgb = _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def _resize_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(gh, gw) -> (height, width), sampling at pixel centres (as PIL and torch do with
    align_corners=False), edges clamped."""
    gh, gw = grid.shape

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = ((np.arange(n_out) + 0.5) * n_in / n_out - 0.5).clip(0, n_in - 1)
        lo = np.floor(pos).astype(int).clip(0, max(n_in - 2, 0))
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, fy = axis(height, gh)
    x0, x1, fx = axis(width, gw)
    rows = grid[y0] * (1 - fy)[:, None] + grid[y1] * fy[:, None]
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def overlay(image: np.ndarray, relevance_grid: np.ndarray | torch.Tensor,
            alpha: float = 0.55, smooth: bool = True) -> np.ndarray:
    """Blend a heat map of ``relevance_grid`` (grid_h, grid_w) over ``image``.

    ``image``: uint8 (H, W) greyscale or (H, W, 3) RGB. The relevance is rescaled to
    [0, 1] (min to max) and upsampled to the image size, bilinearly when ``smooth``
    (else as blocks, one per patch). Returns uint8 RGB (H, W, 3).
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise VitMqaError(f"image must be (H, W) or (H, W, 3), got {np.asarray(image).shape}")
    if not 0.0 <= alpha <= 1.0:
        raise VitMqaError(f"alpha must be in [0, 1], got {alpha}")
    grid = relevance_grid.detach().cpu().numpy() if isinstance(relevance_grid, torch.Tensor) \
        else np.asarray(relevance_grid)
    grid = grid.astype(np.float64)
    if grid.ndim != 2:
        raise VitMqaError(f"relevance grid must be 2-D (grid_h, grid_w), got {grid.shape}")
    span = grid.max() - grid.min()
    grid = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
    h, w = img.shape[:2]
    if smooth:
        heat = _resize_bilinear(grid, h, w)
    else:
        heat = grid[(np.arange(h) * grid.shape[0]) // h][:, (np.arange(w) * grid.shape[1]) // w]
    blended = (1 - alpha) * img.astype(np.float64) + alpha * colormap(heat)
    return np.rint(blended).clip(0, 255).astype(np.uint8)
