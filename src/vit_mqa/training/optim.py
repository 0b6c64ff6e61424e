"""The optimizer and its schedule: AdamW with weight decay on weights only, layer-wise
learning-rate decay for fine-tuning, a frozen backbone, and warm-up then cosine decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config.sections import TrainConfig
from ..models.vit import VisionTransformer


def layer_index(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def make_optimizer(model: VisionTransformer, cfg: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-D parameters (biases,
    norms) nor on those the model's ``no_weight_decay()`` names (position embeddings, the
    CLS token). With ``layer_decay`` < 1, one group per layer with its scaled lr."""
    skip = model.no_weight_decay()
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = layer_index(name, depth) if cfg.layer_decay < 1 else 0
        groups.setdefault((layer, not (p.ndim < 2 or name in skip)), []).append(p)
    # Layers in order, decayed before undecayed within one: a stable group order, which
    # resuming relies on.
    param_groups = []
    for layer, decayed in sorted(groups, key=lambda key: (key[0], not key[1])):
        scale = cfg.layer_decay ** (depth + 1 - layer) if cfg.layer_decay < 1 else 1.0
        param_groups.append({"params": groups[(layer, decayed)], "lr": cfg.lr * scale,
                             "weight_decay": cfg.weight_decay if decayed else 0.0})
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (0.9, cfg.beta2)}
    try:
        # The fused kernel updates every tensor in one pass (CPU and CUDA, torch >= 2.4).
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(param_groups, foreach=device.type != "cpu", **kwargs)


def freeze_backbone(model: VisionTransformer) -> None:
    """Train only the classification head: every other parameter stops taking gradients."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0 to 1, then cosine decay to min_ratio, as a factor of lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class LRSchedule:
    """``lr_factor`` as a callable object, so that the scheduler's state_dict saves its
    fields (LambdaLR keeps a callable object's attributes), and a time budget can set
    ``total_steps`` after each epoch."""

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.min_ratio)
