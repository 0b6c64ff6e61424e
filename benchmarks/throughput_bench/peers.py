"""The implementations compared: vit-mqa's attention variants, and the optional peers
vit-pytorch's ``ViT`` and Hugging Face ``ViTForImageClassification`` (SDPA), each built
at a shape's patch size, width, depth, query heads and MLP width."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from vit_mqa.models.vit import VisionTransformer, ViTConfig

from .shapes import Shape

PEERS = ("vit-pytorch", "hf-vit")


class PeerUnavailable(Exception):
    """A peer implementation is not installed (it is an optional benchmark dependency)."""


class _LogitsOnly(nn.Module):
    """Hugging Face models return an output object; the training step wants logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_vit_mqa(shape: Shape, num_kv_heads: int) -> nn.Module:
    return VisionTransformer(ViTConfig(
        image_size=shape.image_size, patch_size=shape.patch_size, in_channels=shape.in_channels,
        num_classes=shape.num_classes, dim=shape.dim, depth=shape.depth,
        num_heads=shape.num_heads, num_kv_heads=num_kv_heads,
        mlp_ratio=shape.mlp_dim / shape.dim))


def build_vit_pytorch(shape: Shape) -> nn.Module:
    # vit_pytorch/__init__.py imports torchvision (for its other models); its ViT needs
    # only torch and einops, so load that one file.
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable("vit-pytorch is not installed (pip install vit-pytorch)")
    path = f"{list(spec.submodule_search_locations)[0]}/vit.py"
    file_spec = importlib.util.spec_from_file_location("_vit_pytorch_vit", path)
    if file_spec is None or file_spec.loader is None:
        raise PeerUnavailable(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except ImportError as e:
        raise PeerUnavailable(f"vit-pytorch's ViT cannot be imported: {e}") from None
    return module.ViT(image_size=shape.image_size, patch_size=shape.patch_size,
                      num_classes=shape.num_classes, dim=shape.dim, depth=shape.depth,
                      heads=shape.num_heads, mlp_dim=shape.mlp_dim, channels=shape.in_channels,
                      dim_head=shape.dim // shape.num_heads)


def build_hf_vit(shape: Shape) -> nn.Module:
    try:
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTForImageClassification
    except ImportError:
        raise PeerUnavailable("transformers is not installed (pip install transformers)") \
            from None
    config = HFViTConfig(hidden_size=shape.dim, num_hidden_layers=shape.depth,
                         num_attention_heads=shape.num_heads, intermediate_size=shape.mlp_dim,
                         image_size=shape.image_size, patch_size=shape.patch_size,
                         num_channels=shape.in_channels, num_labels=shape.num_classes,
                         attn_implementation="sdpa")
    return _LogitsOnly(ViTForImageClassification(config))


def implementations(shape: Shape) -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    """key -> (label, builder), vit-mqa's attention variants first, then the peers."""
    impls: dict[str, tuple[str, Callable[[], nn.Module]]] = {}
    for key, kv in shape.kv_variants().items():
        impls[f"vit-mqa-{key}"] = (f"vit-mqa {key.upper()} (kv={kv})",
                                   lambda kv=kv: build_vit_mqa(shape, kv))
    impls["vit-mqa-mqa+compile"] = ("vit-mqa MQA (kv=1) + torch.compile",
                                    lambda: build_vit_mqa(shape, 1))
    impls["vit-pytorch"] = ("vit-pytorch ViT", lambda: build_vit_pytorch(shape))
    impls["hf-vit"] = ("HF ViTForImageClassification (sdpa)", lambda: build_hf_vit(shape))
    return impls
