"""The model shapes every implementation is built at, and the batch sizes they run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vit_mqa.config.presets import PRESETS


@dataclass(frozen=True)
class Shape:
    """A model shape that every implementation can build."""

    name: str
    image_size: int
    patch_size: int
    in_channels: int
    num_classes: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    train_on_cpu: bool = True  # ViT-S at 224 px is timed for inference only on a CPU

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def kv_variants(self) -> dict[str, int]:
        """MQA, GQA (num_heads / 2, where that is a third distinct choice) and MHA."""
        variants = {"mqa": 1}
        half = self.num_heads // 2
        if self.num_heads % 2 == 0 and half > 1:
            variants["gqa"] = half
        if self.num_heads > 1:
            variants["mha"] = self.num_heads
        return variants


def _preset_shape() -> Shape:
    m = PRESETS["mnist-fast"]["model"]
    return Shape("mnist-fast", 28, m["patch_size"], 1, 10, m["dim"], m["depth"], m["num_heads"],
                 int(m["dim"] * m["mlp_ratio"]))


SHAPES: dict[str, Shape] = {
    "mnist-fast": _preset_shape(),
    # ViT-Ti / ViT-S widths (Touvron et al. 2021).
    "vit-ti-32": Shape("vit-ti-32", 32, 4, 3, 10, 192, 12, 3, 768),
    "vit-s-224": Shape("vit-s-224", 224, 16, 3, 1000, 384, 12, 6, 1536, train_on_cpu=False),
}


def default_batch(shape: Shape, mode: str, device: torch.device) -> int:
    if device.type == "cuda":
        return 256 if shape.image_size >= 224 else 1024
    if shape.image_size >= 224:
        return 16
    return 64 if mode == "train" and shape.name == "mnist-fast" else 128 if mode == "train" \
        else 256
