"""Vision Transformer with multi-query / grouped-query attention.

Read top to bottom: position embeddings, the three stems (patch embedding, strided
convolutions, convolutions with max-pooling), encoder block, initialisation, input and
output checks, the model. As in timm, ``forward_features`` returns normalised tokens,
``forward_head`` pools and classifies, and ``get_intermediate_layers`` returns chosen
blocks' outputs; ``attention_maps`` computes the per-layer attention probabilities on
request. Reading and writing model folders (``save_pretrained`` / ``from_pretrained``:
``config.json`` + ``model.safetensors``, as in Hugging Face) and the fine-tuning helpers
``reset_classifier`` / ``no_weight_decay`` come from :mod:`vit_mqa.models.hub`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import WEIGHTS_NAME
from ..config.sections import ViTConfig
from ..errors import VitMqaError
from .attention import GroupedQueryAttention
from .hub import PretrainedMixin, load_model
from .hub import resolve_model_dir as resolve_model_dir  # importable from here too
from .hub import save_model_dir as save_model_dir  # importable from here too


def sincos_2d_position_embedding(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine embedding (MoCo v3 / "Better plain ViT baselines"), (H*W, dim)."""
    if dim % 4:
        raise VitMqaError(f"pos_embed 'sincos2d' needs dim divisible by 4, got {dim}")
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                          torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4 - 1 or 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches, linearly projected.

    The weight is a strided convolution's (dim, C, P, P), as in timm and Hugging Face,
    but the projection runs as one matrix product over the cut-out patches: the same
    result, and on CPUs a several times cheaper backward pass than the convolution's.
    """

    def __init__(self, in_channels: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        P = self.patch_size
        # (B, C, H/P, P, W/P, P) -> (B, H/P, W/P, C, P, P): each patch in the weight's order.
        patches = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(B, (H // P) * (W // P), C * P * P)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, patches, dim)


class ConvStem(nn.Module):
    """Early convolutions (Xiao et al. 2021) in place of the patchify layer.

    3x3 stride-2 convolutions, each with BatchNorm and ReLU, doubling the channels up to
    ``dim``, then a 1x1 convolution to ``dim``: as many halvings as a patch side takes
    (28 px, patch 7: 28 -> 14 -> 7 -> 4), so the token grid is the patches' grid, but each
    token sees an overlapping neighbourhood built up by convolutions.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels, *widths], widths):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(widths[-1], dim, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(2).transpose(1, 2)  # (B, grid_h * grid_w, dim)


class ConvPoolTokenizer(nn.Module):
    """The Compact Convolutional Transformer's tokenizer (Hassani et al. 2021).

    Per halving: a 3x3 stride-1 convolution (no bias) and ReLU at full resolution, then a
    3x3 stride-2 max-pooling; the channels double up to ``dim``, which the last
    convolution outputs. The grid is the conv stem's, but each convolution sees every
    pixel of its input: about 3x the conv stem's multiply-adds (28 px, dim 128: 7.5M
    against 2.4M), and max-pooling's tolerance of small shifts. ``convs_per_stage`` > 1
    stacks that many convolutions before each pooling, VGG-style (the later ones keep
    the channels).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], dim: int,
                 convs_per_stage: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [in_channels, *widths[:-1], dim]
        for c_in, c_out in zip(channels, channels[1:]):
            for c in [c_in] + [c_out] * (convs_per_stage - 1):
                layers += [nn.Conv2d(c, c_out, kernel_size=3, stride=1, padding=1, bias=False),
                           nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(2).transpose(1, 2)  # (B, grid_h * grid_w, dim)


def make_stem(config: ViTConfig) -> nn.Module:
    c = config
    if c.stem == "conv":
        return ConvStem(c.in_channels, c.stem_widths, c.dim)
    if c.stem == "cct":
        return ConvPoolTokenizer(c.in_channels, c.stem_widths, c.dim, c.stem_convs)
    return PatchEmbed(c.in_channels, c.patch_size, c.dim)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        c = config
        self.norm1 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.attn = GroupedQueryAttention(
            c.dim, c.num_heads, c.num_kv_heads, c.qkv_bias, c.qk_norm, c.attn_dropout, c.dropout
        )
        self.norm2 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlp = MLP(c.dim, c.mlp_dim, c.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_layer(m: nn.Module) -> None:
    """Initialise one layer of the model (its own parameters, not its children's)."""
    # Xavier-uniform projections, as in the original (JAX) ViT, rather than timm's
    # trunc-normal(0.02). No recorded run compares the two; the recorded ablations are
    # in docs/benchmarks.md, "Ablation: mnist-3min, one change at a time".
    if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
        # The convolutional stems' layers feed ReLUs (He et al. 2015).
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        m.reset_parameters()
    elif isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_head(head: nn.Linear) -> None:
    """A new head: truncated-normal (std 0.02) weights, zero bias."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)


def init_weights(model: VisionTransformer) -> None:
    """Initialise every parameter of ``model``: each layer by ``init_layer``, then the
    position embeddings, the CLS token and the head."""
    if model.head.weight.is_meta:
        # A shape-only skeleton (load_model_dir's check): nothing to initialise, and
        # initialisers under the meta device would import torch's compiler (1.7 s).
        return
    for m in model.modules():
        init_layer(m)
    if isinstance(model.pos_embed, nn.Parameter):
        nn.init.trunc_normal_(model.pos_embed, std=0.02)
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    model._init_head()


def chosen_blocks(n: int | Sequence[int], depth: int) -> set[int]:
    """The blocks ``get_intermediate_layers`` returns (timm's semantics): an int takes the
    last ``n`` blocks; a sequence takes those block indices (negative ones count from the
    end)."""
    if isinstance(n, int) and not isinstance(n, bool):
        if not 1 <= n <= depth:
            raise VitMqaError(f"n must be 1 to {depth} (the model's depth), got {n}")
        return set(range(depth - n, depth))
    if not n or not all(isinstance(i, int) and -depth <= i < depth for i in n):
        raise VitMqaError(f"block indices must be ints in [-{depth}, {depth}), got {n!r}")
    return {i % depth for i in n}


def split_prefix(tokens: torch.Tensor, prefix: int, grid: tuple[int, int] | None,
                 with_prefix: bool) -> Any:
    """A block's output (B, prefix + patches, dim) as ``get_intermediate_layers`` returns
    it: the patch tokens (B, patches, dim), as (B, dim, grid_h, grid_w) given ``grid``; with
    ``with_prefix``, the pair (patch tokens, prefix tokens (B, prefix, dim))."""
    patches = tokens[:, prefix:]
    if grid is not None:
        patches = patches.reshape(tokens.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
    return (patches, tokens[:, :prefix]) if with_prefix else patches


def check_images(x: torch.Tensor, config: ViTConfig) -> None:
    """A clear error for anything but a batch of the model's images (B, C, H, W)."""
    c = config
    if x.ndim != 4 or x.shape[1] != c.in_channels or tuple(x.shape[2:]) != c.image_size:
        raise VitMqaError(
            f"expected images of shape (B, {c.in_channels}, {c.image_size[0]}, "
            f"{c.image_size[1]}), got {tuple(x.shape)}"
        )


class VisionTransformer(nn.Module, PretrainedMixin, library_name="vit-mqa", license="mit",
                        pipeline_tag="image-classification",
                        tags=["vision-transformer", "multi-query-attention"]):
    """A ViT whose attention has ``num_kv_heads`` shared key/value heads.

    ``preprocess`` turns images into this model's input (a loaded model has its run's
    normalisation; a new one scales pixels to [-1, 1]) and ``classes`` names its outputs;
    both live in ``config``, the model's one record of what it is.
    ``PretrainedMixin`` adds loading, saving and the fine-tuning helpers (models.hub).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.patch_embed = make_stem(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.pooling == "cls" else None
        num_tokens = c.num_prefix_tokens + c.num_patches
        if c.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, c.dim))
        else:
            fixed = torch.zeros(1, num_tokens, c.dim)
            fixed[0, c.num_prefix_tokens:] = sincos_2d_position_embedding(c.grid_size, c.dim)
            self.register_buffer("pos_embed", fixed, persistent=False)
        self.pos_drop = nn.Dropout(c.dropout)
        # Stochastic depth grows linearly with depth (DeiT).
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList([Block(c, r) for r in rates])
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        # Sequence pooling's score per token (pooling "seq").
        self.pool_score = nn.Linear(c.dim, 1) if c.pooling == "seq" else None
        self.head_drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)

    def _init_head(self) -> None:  # also for reset_classifier (PretrainedMixin)
        init_head(self.head)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the first block's input tokens (B, prefix + patches, dim)."""
        check_images(x, self.config)
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + patches, dim)."""
        x = self._embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pooling_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's weight in the pooled output, (B, tokens), summing to 1: the CLS
        token's one-hot row, a uniform row for mean pooling, learned scores for "seq"."""
        B, N = tokens.shape[:2]
        if self.pool_score is not None:
            return self.pool_score(tokens).squeeze(-1).softmax(dim=-1)
        if self.config.pooling == "cls":
            return F.one_hot(tokens.new_zeros(B, dtype=torch.long), N).to(tokens.dtype)
        return tokens.new_full((B, N), 1.0 / N)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normalised tokens -> logits (or, with ``pre_logits``, the pooled (B, dim)): the
        tokens averaged by ``pooling_weights``, the one description of the pooling."""
        pooled = (self.pooling_weights(tokens).unsqueeze(1) @ tokens).squeeze(1)
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
        return_prefix_tokens: bool = False, norm: bool = False,
    ) -> tuple[Any, ...]:
        """Outputs of chosen blocks for images x, in block order (timm's semantics).

        ``n``: an int takes the last ``n`` blocks; a sequence takes those block indices
        (negative ones count from the end). Each output is the block's patch tokens
        (B, patches, dim), without the CLS token; ``norm`` applies the final LayerNorm
        first, ``reshape`` gives (B, dim, grid_h, grid_w), and ``return_prefix_tokens``
        makes each item a pair (patch tokens, prefix tokens (B, prefix, dim)).
        """
        take = chosen_blocks(n, len(self.blocks))
        x = self._embed(x)
        outputs = []
        for i, block in enumerate(self.blocks[:max(take) + 1]):  # later blocks are not needed
            x = block(x)
            if i in take:
                outputs.append(self.norm(x) if norm else x)
        grid = self.config.grid_size if reshape else None
        return tuple(split_prefix(out, self.config.num_prefix_tokens, grid, return_prefix_tokens)
                     for out in outputs)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer attention probabilities (B, heads, tokens, tokens) for images x,
        computed in eval mode (no dropout), whatever mode the model is in."""
        was_training = self.training
        self.eval()
        try:
            maps = []
            x = self._embed(x)
            for block in self.blocks:
                maps.append(block.attn.attention_weights(block.norm1(x)))
                x = block(x)
            return maps
        finally:
            self.train(was_training)


def load_model_dir(directory: str | Path, weights: str = WEIGHTS_NAME,
                   map_location: str | torch.device = "cpu", **hub_options: Any
                   ) -> tuple[VisionTransformer, dict[str, Any]]:
    """(model in eval mode, full config dict) from a run or model directory, or a Hub
    model id (``hub_options`` go to ``huggingface_hub.snapshot_download``). The model
    carries the run's ``preprocess`` and ``classes``."""
    return load_model(VisionTransformer, directory, weights, map_location, **hub_options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
