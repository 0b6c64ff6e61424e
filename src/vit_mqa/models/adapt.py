"""A model's copies for other settings: fine-tuning's weight transfer, another image size
(position embeddings resampled), fewer K/V heads (Ainslie et al. 2023's mean-pooling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint import describe_mismatch
from ..errors import VitMqaError
from .vit import VisionTransformer, ViTConfig


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int],
                       new_grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Bicubic resampling of a (1, prefix + H*W, D) grid of position embeddings (as timm)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


def adapt_state_dict(state: dict[str, torch.Tensor], source: ViTConfig,
                     target: ViTConfig) -> dict[str, torch.Tensor]:
    """Resample learned position embeddings when the patch grid differs."""
    if "pos_embed" in state and source.grid_size != target.grid_size:
        state = dict(state)
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], source.grid_size,
                                                target.grid_size, source.num_prefix_tokens)
    return state


def transfer_weights(model: VisionTransformer, source: VisionTransformer,
                     where: str | Path) -> list[str]:
    """Copy ``source``'s weights into ``model`` to fine-tune it, and return what was adapted.

    Another number of classes gets a freshly initialised head; another image size (patch
    grid) gets bicubically resampled position embeddings. Another channel count, stem or
    pooling is refused, as is any other difference of shape.
    """
    src, dst = source.config, model.config
    if src.in_channels != dst.in_channels:
        raise VitMqaError(f"{where} takes {src.in_channels}-channel images and this model "
                          f"{dst.in_channels}: the patch embedding cannot be reused (convert "
                          f"the images: `in_channels` {src.in_channels})")
    if src.stem != dst.stem:
        raise VitMqaError(f"{where} has a {src.stem} stem and this model a {dst.stem} stem: "
                          f"the weights cannot be reused (set `stem` {src.stem})")
    if src.stem_convs != dst.stem_convs:
        raise VitMqaError(f"{where} has {src.stem_convs} convolution(s) per tokenizer stage and "
                          f"this model {dst.stem_convs}: the weights cannot be reused (set "
                          f"`stem_convs` {src.stem_convs})")
    if src.pooling != dst.pooling:
        raise VitMqaError(f"{where} pools its tokens with {src.pooling!r} and this model with "
                          f"{dst.pooling!r}: the weights cannot be reused as they are (set "
                          f"`pooling` {src.pooling})")
    state = adapt_state_dict(source.state_dict(), src, dst)
    target = model.state_dict()
    notices = []
    if src.grid_size != dst.grid_size and "pos_embed" in state:
        notices.append(f"position embeddings resampled from a {src.grid_size[0]}x"
                       f"{src.grid_size[1]} to a {dst.grid_size[0]}x{dst.grid_size[1]} grid")
    new_head = src.num_classes != dst.num_classes
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        target = {k: v for k, v in target.items() if not k.startswith("head.")}
        notices.append(f"the classification head was re-initialised for {dst.num_classes} "
                       f"classes (the source has {src.num_classes})")
    mismatch = describe_mismatch({k: tuple(v.shape) for k, v in state.items()},
                                 {k: tuple(v.shape) for k, v in target.items()})
    if mismatch:
        raise VitMqaError(f"the weights in {where} do not fit this model ({mismatch})")
    with torch.no_grad():
        for name, value in state.items():
            target[name].copy_(value)
    return notices


@torch.no_grad()
def convert_kv_heads(model: VisionTransformer, num_kv_heads: int) -> VisionTransformer:
    """A copy of ``model`` with ``num_kv_heads`` K/V heads, each the mean of its group's
    heads (Ainslie et al. 2023). Query, output and MLP weights are kept as they are."""
    c = model.config
    if num_kv_heads < 1 or c.num_kv_heads % num_kv_heads:
        raise VitMqaError(f"`num_kv_heads` {num_kv_heads} must divide the model's "
                          f"{c.num_kv_heads} K/V heads")
    converted = copy_with(model, num_kv_heads=num_kv_heads)
    state = model.state_dict()
    hd, H, old = c.dim // c.num_heads, c.num_heads, c.num_kv_heads
    for i in range(c.depth):
        for kind in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{kind}"
            if key not in state:
                continue
            q, k, v = state[key].split([H * hd, old * hd, old * hd])
            state[key] = torch.cat([q, _pool_heads(k, num_kv_heads, hd),
                                    _pool_heads(v, num_kv_heads, hd)])
    converted.load_state_dict(state)
    return converted.eval()


def _pool_heads(rows: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """(heads * hd, ...) projection rows -> (groups * hd, ...): mean of consecutive heads.
    Query head h reads K/V head h // (H / KV), so consecutive K/V heads form a group."""
    per_group = rows.shape[0] // (groups * head_dim)
    pooled = rows.reshape(groups, per_group, head_dim, *rows.shape[1:]).mean(dim=1)
    return pooled.reshape(groups * head_dim, *rows.shape[1:])


def resize_model(model: VisionTransformer, image_size: int | tuple[int, int]
                 ) -> VisionTransformer:
    """A copy of ``model`` for another input size: learned position embeddings are
    resampled bicubically to the new patch grid (as timm does)."""
    resized = copy_with(model, image_size=image_size)
    resized.load_state_dict(adapt_state_dict(model.state_dict(), model.config, resized.config))
    return resized.train(model.training)


def copy_with(model: VisionTransformer, **changes: Any) -> VisionTransformer:
    """A new, freshly initialised model of ``model``'s config with ``changes``: the one way
    every copy here is made, so that each keeps the model's class names and preprocessing
    (a new number of classes gets the default names)."""
    fields = {**model.config.to_dict(), **changes}
    names = fields.get("classes")
    if names is not None and len(names) != fields["num_classes"]:
        fields["classes"] = None
    return VisionTransformer(ViTConfig.from_dict(fields))
