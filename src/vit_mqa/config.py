"""Every setting of a run, in one place: the four config sections, their checks, and how
presets, JSON files and flags are layered into a run's config.

A run is described by a plain nested dict with the sections "model", "data", "augment"
and "train" (plus the preset's name), as saved in its ``config.json``. Each section is a
dataclass below that checks itself when made. A setting's documentation is the string
under it: ``vit-mqa train --help`` shows it. This module imports no torch, so that the
command line answers ``--help`` at once.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MAX_IMAGE_SIDE, VitMqaError, check_field_types, dataclass_from_dict
from .presets import DEFAULT_PRESET, PRESETS

# Bounds on what a config may ask for. A run directory is something people download: its
# config.json must not be able to make the loader allocate without limit.
MAX_TOKENS = 65536
MAX_DEPTH = 256
MAX_PARAMETERS = 2_000_000_000

IDX_DATASETS = ("mnist", "fashion-mnist")
RESIZES = ("stretch", "pad", "center-crop")
# Settings whose value is one of a few names; the flags list them.
CHOICES: dict[str, tuple[str, ...]] = {
    "stem": ("patch", "conv", "cct"),
    "pooling": ("cls", "mean", "seq"),
    "pos_embed": ("learned", "sincos2d"),
    "resize": RESIZES,
    "init_normalization": ("source", "data"),
    "select": ("best", "last"),
}


def parse_duration(text: str) -> float:
    """Seconds from "180", "180s", "3m", "3min", "1.5h"."""
    units = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    number = text.strip().rstrip("".join(units)).strip()
    unit = text.strip()[len(number):].strip() or "s"
    try:
        seconds = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"not a duration: {text!r} (e.g. 180, 180s, 3m, 1h)") from None
    return seconds


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise VitMqaError(f"image_size must be an int or (height, width), got {value!r}")
    return (int(value[0]), int(value[1]))


def _check_choice(section: str, name: str, value: str) -> None:
    if value not in CHOICES[name]:
        raise VitMqaError(f"{section}.{name} must be one of {', '.join(CHOICES[name])}, "
                          f"got {value!r}")


@dataclass
class ViTConfig:
    """Everything that defines the network; saved as the "model" part of config.json."""

    image_size: int | tuple[int, int] = 28
    """Input height and width (one int for square images); set from the data in training."""
    patch_size: int = 4
    """Side of the square patches that become tokens; must divide the image size."""
    stem: str = "patch"
    """How images become tokens: "patch" (each patch linearly projected, the plain ViT),
    "conv" (3x3 stride-2 convolutions to the same token grid; Xiao et al. 2021) or "cct"
    (3x3 stride-1 convolutions, each followed by a 3x3 stride-2 max-pooling, to the same
    grid: the tokenizer of the Compact Convolutional Transformer, Hassani et al. 2021)."""
    in_channels: int = 1
    """Image channels (1 grayscale, 3 RGB); set from the data in training."""
    num_classes: int = 10
    """Outputs of the classification head; set from the data in training."""
    dim: int = 64
    """Width of the token embeddings."""
    depth: int = 6
    """Number of transformer blocks."""
    num_heads: int = 4
    """Query heads per attention layer."""
    num_kv_heads: int = 1
    """Key/value heads shared by the query heads: 1 = multi-query, num_heads = multi-head,
    a divisor in between = grouped-query."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's MLP, as a multiple of dim."""
    qkv_bias: bool = True
    """Biases in the query/key/value projection."""
    pooling: str = "cls"
    """What the head reads: the CLS token ("cls"), the mean of the patch tokens ("mean"),
    or their average weighted by a learned softmax score per token ("seq", the sequence
    pooling of Hassani et al. 2021)."""
    pos_embed: str = "learned"
    """Position embeddings: "learned", or fixed 2-D sine-cosine ("sincos2d")."""
    dropout: float = 0.0
    """Dropout after the embeddings, in the MLPs and before the head."""
    attn_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    drop_path: float = 0.0
    """Stochastic depth of the last block, growing linearly from 0 at the first."""
    qk_norm: bool = False
    """LayerNorm on queries and keys per head (stabilises large learning rates)."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon (timm 1e-6; Hugging Face ViT 1e-12)."""

    def __post_init__(self) -> None:
        self.image_size = _pair(self.image_size)
        self.validate()

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.pooling == "cls" else 0

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def stem_widths(self) -> list[int]:
        """Output channels of the convolutional stems' 3x3 layers: one per halving that a
        patch takes (ceil(log2 patch_size)), doubling up to dim, at least 8."""
        n = (self.patch_size - 1).bit_length()
        return [max(self.dim >> (n - 1 - i), 8) for i in range(n)]

    def validate(self) -> None:
        check_field_types(self, "model")
        h, w = self.image_size
        positive = ("patch_size", "in_channels", "num_classes", "dim", "depth", "num_heads")
        for name in positive:
            if getattr(self, name) < 1:
                raise VitMqaError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
            raise VitMqaError(f"image_size must be 1 to {MAX_IMAGE_SIDE} per side, "
                              f"got {self.image_size}")
        if self.depth > MAX_DEPTH:
            raise VitMqaError(f"depth must be <= {MAX_DEPTH}, got {self.depth}")
        if h % self.patch_size or w % self.patch_size:
            raise VitMqaError(
                f"patch_size {self.patch_size} does not divide image size {h}x{w}"
            )
        if self.dim % self.num_heads:
            raise VitMqaError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise VitMqaError(
                f"num_kv_heads {self.num_kv_heads} must be a divisor of num_heads "
                f"{self.num_heads} (1 = multi-query, {self.num_heads} = multi-head)"
            )
        _check_choice("model", "stem", self.stem)
        if self.stem in ("conv", "cct"):
            # Each 3x3 stride-2 convolution or max-pooling (padding 1) maps a side s to
            # ceil(s / 2).
            halvings = len(self.stem_widths)
            grid = tuple(-(-side // 2**halvings) for side in (h, w))
            if self.patch_size < 2 or grid != self.grid_size:
                raise VitMqaError(
                    f"stem {self.stem!r} halves the image {halvings} times, which makes a "
                    f"{grid[0]}x{grid[1]} grid from {h}x{w}, not the {self.grid_size[0]}x"
                    f"{self.grid_size[1]} of patch_size {self.patch_size}; use a patch_size "
                    f"of 2 or more whose halvings reach that grid (a power of two always does)")
        _check_choice("model", "pooling", self.pooling)
        _check_choice("model", "pos_embed", self.pos_embed)
        if not 0 < self.mlp_ratio <= 64 or self.dim * self.mlp_ratio < 1:
            raise VitMqaError(f"mlp_ratio must be in (0, 64] and give an MLP of at least one "
                              f"unit, got {self.mlp_ratio} (with dim {self.dim})")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise VitMqaError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.norm_eps < 1:
            raise VitMqaError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if self.num_patches + self.num_prefix_tokens > MAX_TOKENS:
            raise VitMqaError(f"{self.num_patches} patches is more than {MAX_TOKENS} tokens; "
                              "use a larger patch_size or a smaller image_size")
        if self.num_parameters() > MAX_PARAMETERS:
            raise VitMqaError(f"this config has {self.num_parameters():,} parameters, more "
                              f"than the limit of {MAX_PARAMETERS:,}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        return dataclass_from_dict(cls, d, "model config")

    def num_parameters(self) -> int:
        """Parameter count from the formula (the tests check it against the module)."""
        D, L, hd = self.dim, self.depth, self.dim // self.num_heads
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * hd
        attn = D * qkv_out + (qkv_out if self.qkv_bias else 0) + D * D + D
        attn += 4 * hd if self.qk_norm else 0
        mlp = D * self.mlp_dim + self.mlp_dim + self.mlp_dim * D + D
        block = 2 * 2 * D + attn + mlp  # two LayerNorms
        if self.stem == "conv":  # 3x3 convolutions without bias, BatchNorm, a 1x1 to D
            widths = [self.in_channels, *self.stem_widths]
            patch = sum(9 * a * b + 2 * b for a, b in zip(widths, widths[1:]))
            patch += widths[-1] * D + D
        elif self.stem == "cct":  # 3x3 convolutions without bias, the last one to D
            widths = [self.in_channels, *self.stem_widths[:-1], D]
            patch = sum(9 * a * b for a, b in zip(widths, widths[1:]))
        else:
            patch = self.in_channels * self.patch_size**2 * D + D
        pos = (self.num_patches + self.num_prefix_tokens) * D if self.pos_embed == "learned" else 0
        cls_token = D if self.pooling == "cls" else 0
        head = 2 * D + D * self.num_classes + self.num_classes
        head += (D + 1) if self.pooling == "seq" else 0  # the per-token score
        return patch + pos + cls_token + L * block + head


@dataclass
class DataConfig:
    """Which data, where from, and how it is split; the "data" part of config.json."""

    dataset: str = "mnist"
    """"mnist", "fashion-mnist", or an image folder (one sub-folder per class, optionally
    under train/ and test/)."""
    data_dir: str | None = None
    """Where the MNIST-style files are; searched first, then $VIT_MQA_DATA, the cache and
    /usr/share/datasets."""
    val_size: float | None = None
    """Validation images carved from the training set with a fixed seed: a count (500) or
    a fraction (0.1). Unset: 10 % of the training images, at most 5000."""
    split_seed: int = 0
    """Seed of the validation split, which does not move with the training seed."""
    image_size: int | None = None
    """Resize image-folder pictures to this side; unset keeps the first image's size."""
    in_channels: int | None = None
    """Image folders: 1 (grayscale) or 3 (RGB) channels; unset, the first image decides."""
    resize: str = "stretch"
    """How image-folder pictures of another shape reach image_size: "stretch", "pad" (fit
    inside, black borders) or "center-crop"; also applied at prediction."""
    download: bool = True
    """Fetch a missing MNIST / Fashion-MNIST into the cache."""

    def __post_init__(self) -> None:
        self.validate()

    def val_count(self, num_images: int) -> int:
        """The number of validation images out of ``num_images`` training images."""
        if self.val_size is None:
            return max(1, min(5000, round(0.1 * num_images)))
        if self.val_size < 1:
            return max(1, round(self.val_size * num_images))
        return int(self.val_size)

    def validate(self) -> None:
        check_field_types(self, "data")
        count = self.val_size is not None and self.val_size >= 1
        if self.val_size is not None and not (
                0 < self.val_size < 1 or (count and float(self.val_size).is_integer())):
            raise VitMqaError(f"val_size must be a count of images (>= 1) or a fraction "
                              f"between 0 and 1, got {self.val_size}")
        if self.split_seed < 0:
            raise VitMqaError(f"split_seed must be >= 0, got {self.split_seed}")
        if self.in_channels not in (None, 1, 3):
            raise VitMqaError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size is not None and not 1 <= self.image_size <= MAX_IMAGE_SIDE:
            raise VitMqaError(f"image_size must be 1 to {MAX_IMAGE_SIDE}, got {self.image_size}")
        if self.resize not in RESIZES:
            raise VitMqaError(f"unknown resize {self.resize!r}: use one of {', '.join(RESIZES)}")


@dataclass
class AugmentConfig:
    """The "augment" part of config.json; all zeros/ones switches it off."""

    rotate: float = 10.0
    """Largest rotation in degrees, uniform in [-rotate, rotate]."""
    scale_min: float = 0.9
    """Smallest isotropic zoom, uniform in [scale_min, scale_max]."""
    scale_max: float = 1.1
    """Largest isotropic zoom."""
    translate: float = 0.1
    """Largest shift, as a fraction of height and width."""
    hflip: float = 0.0
    """Probability of a horizontal flip (clothing, not digits)."""
    erase: float = 0.0
    """Probability of erasing one random rectangle to the background (Zhong et al. 2017)."""
    erase_min_area: float = 0.02
    """Smallest share of the image the erased rectangle covers."""
    erase_max_area: float = 0.33
    """Largest share of the image the erased rectangle covers."""
    erase_ratio: float = 3.3
    """The rectangle's aspect ratio is log-uniform in [1/ratio, ratio]."""
    mixup: float = 0.0
    """Mixup (Zhang et al. 2018): blend each batch with itself reversed, weight drawn from
    Beta(mixup, mixup), targets blended alike; 0 = off."""
    cutmix: float = 0.0
    """CutMix (Yun et al. 2019): paste a box of the reversed batch into each image, its
    share of the area from Beta(cutmix, cutmix), targets weighted by area; 0 = off. With
    mixup also on, each batch takes one of the two at random."""
    mix_prob: float = 1.0
    """Share of batches that mixup or CutMix mixes (the rest train on plain targets)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_field_types(self, "augment")
        if not (0 <= self.rotate <= 360 and 0 <= self.translate <= 1):
            raise VitMqaError(f"need rotate in [0, 360] degrees and translate in [0, 1], got "
                              f"{self.rotate}, {self.translate}")
        if not (0 <= self.hflip <= 1 and 0 <= self.erase <= 1):
            raise VitMqaError(f"hflip and erase are probabilities in [0, 1], got "
                              f"{self.hflip}, {self.erase}")
        if not 0 < self.erase_min_area <= self.erase_max_area <= 1 or self.erase_ratio < 1:
            raise VitMqaError(
                f"need 0 < erase_min_area <= erase_max_area <= 1 and erase_ratio >= 1, got "
                f"{self.erase_min_area}, {self.erase_max_area}, {self.erase_ratio}")
        if not (0 <= self.mixup <= 100 and 0 <= self.cutmix <= 100
                and 0 <= self.mix_prob <= 1):
            raise VitMqaError(f"need mixup and cutmix in [0, 100] (Beta parameters; 0 = off) "
                              f"and mix_prob in [0, 1], got {self.mixup}, {self.cutmix}, "
                              f"{self.mix_prob}")
        if not 0 < self.scale_min <= self.scale_max <= 100:
            raise VitMqaError(
                f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}"
            )

    @property
    def affine(self) -> bool:
        return self.rotate > 0 or self.translate > 0 or self.scale_min != 1 or self.scale_max != 1

    @property
    def enabled(self) -> bool:
        return self.affine or self.hflip > 0 or self.erase > 0

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0


@dataclass
class TrainConfig:
    """The "train" part of config.json."""

    epochs: int = 10
    """Passes over the training set."""
    batch_size: int = 128
    """Images per optimizer step, over all processes."""
    lr: float = 2e-3
    """Peak learning rate, reached after the warm-up."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: float = 1.0
    """Epochs of linear warm-up from 0 to lr."""
    weight_decay: float = 0.05
    """AdamW weight decay; not applied to biases, norms, position embeddings, CLS token."""
    beta2: float = 0.999
    """AdamW's second-moment decay."""
    label_smoothing: float = 0.1
    """Share of the target spread evenly over all classes."""
    grad_clip: float = 1.0
    """Largest global gradient norm; 0 switches clipping off."""
    bf16: bool = False
    """bf16 autocast (fast on GPUs and CPUs with native bf16 matmul)."""
    compile: bool = False
    """torch.compile the training step's model (falls back to eager)."""
    seed: int = 0
    """Fixes initialisation, data order, augmentation and dropout."""
    device: str = "auto"
    """"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:1", "mps"."""
    eval_batch_size: int = 1000
    """Images per batch in validation and test."""
    max_steps: int = 0
    """Stop after this many optimizer steps in all (0 = no cap)."""
    time_budget: float = 0.0
    """Seconds of training to plan for (0 = off; the flag takes 180, 180s, 3m or 1h): after
    every epoch the schedule's length is set from the pace so far, so that the cosine ends
    when the budget does, at most at `epochs`; training stops at the budget in any case.
    The number of steps then depends on the machine's speed."""
    select: str = "best"
    """The weights a run keeps (model.safetensors) and tests: those of the epoch with the
    "best" validation accuracy, or the "last" epoch's (with ema_decay, the final average)."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights, updated every step (0 = off; 0.998
    averages about the last 500 steps); validation, model selection, the saved weights
    and the test score then use the average."""
    tensorboard: bool = False
    """Also log scalars to RUN/tensorboard/ (needs tensorboard)."""
    freeze_backbone: bool = False
    """Train only the classification head (a linear probe)."""
    layer_decay: float = 1.0
    """Below 1, each block's learning rate is lr * layer_decay ** (blocks above it + 1);
    the head keeps lr (Clark et al. 2020; BEiT)."""
    init_normalization: str = "source"
    """With --init-from: "source" normalises inputs with the pretrained model's mean and
    std, "data" recomputes them from this data."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_field_types(self, "train")
        positive = ("epochs", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise VitMqaError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise VitMqaError(f"need 0 <= min_lr <= lr and lr > 0, got {self.min_lr}, {self.lr}")
        if self.lr > 10:
            raise VitMqaError(f"lr {self.lr} is far outside any useful range (at most 10)")
        if not 0 <= self.beta2 < 1:
            raise VitMqaError(f"beta2 must be in [0, 1), got {self.beta2}")
        if not 0 <= self.seed < 2**63:
            raise VitMqaError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.epochs > 100_000 or self.warmup_epochs > 100_000:
            raise VitMqaError(f"epochs and warmup_epochs must be <= 100000, got "
                              f"{self.epochs}, {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise VitMqaError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise VitMqaError("warmup_epochs, weight_decay and grad_clip must be >= 0")
        if self.max_steps < 0:
            raise VitMqaError(f"max_steps must be >= 0, got {self.max_steps}")
        if not 0 <= self.ema_decay < 1:
            raise VitMqaError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.time_budget <= 10**7:
            raise VitMqaError(f"time_budget must be 0 (off) to 10000000 seconds, got "
                              f"{self.time_budget}")
        _check_choice("train", "select", self.select)
        if not 0 < self.layer_decay <= 1:
            raise VitMqaError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        _check_choice("train", "init_normalization", self.init_normalization)


SECTIONS: dict[str, type] = {
    "model": ViTConfig,
    "data": DataConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
}
# Settings a resumed run may change: where data lives, where and how fast it runs,
# how long.
RESUME_OVERRIDABLE = (("train", "epochs"), ("train", "max_steps"), ("train", "device"),
                      ("train", "eval_batch_size"), ("train", "compile"), ("data", "data_dir"),
                      ("train", "tensorboard"))
# Taken from the data, never from a flag.
DERIVED_MODEL_FIELDS = ("image_size", "in_channels", "num_classes")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation: the string literal under it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def default_config() -> dict[str, dict[str, Any]]:
    config = {}
    for section, cls in SECTIONS.items():
        config[section] = {f.name: copy.deepcopy(f.default) for f in dataclasses.fields(cls)}
    config["model"]["image_size"] = list(ViTConfig().image_size)
    return config


def field_section(name: str) -> str:
    """The section that owns a flat setting name (names are unique across sections)."""
    for section, cls in SECTIONS.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            if section == "model" and name in DERIVED_MODEL_FIELDS:
                continue  # e.g. image_size: the data section's is the one to set
            return section
    raise VitMqaError(f"unknown setting {name!r}")


def _merge(config: dict[str, dict[str, Any]], layer: dict[str, Any], origin: str) -> None:
    for section, values in layer.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise VitMqaError(f"{origin}: unknown config section {section!r} "
                              f"(expected {', '.join(SECTIONS)})")
        for key, value in values.items():
            if key not in config[section]:
                raise VitMqaError(f"{origin}: unknown setting {section}.{key}")
            config[section][key] = checked_value(section, key, value, origin)


def checked_value(section: str, key: str, value: Any, origin: str) -> Any:
    """The value if its type fits the setting (ints are accepted for floats), else an error."""
    ftype = str(next(f.type for f in dataclasses.fields(SECTIONS[section]) if f.name == key))
    base = ftype.split("|")[0].strip()
    if value is None and "None" in ftype:
        return None
    kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
    if base not in kinds:  # image_size: int or [h, w]; checked by ViTConfig itself
        return value
    if isinstance(value, kinds[base]) and (base == "bool" or not isinstance(value, bool)):
        return float(value) if base == "float" else value
    raise VitMqaError(f"{origin}: {section}.{key} must be {ftype}, got {value!r}")


def build_config(preset: str | None = None, config_file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None,
                 init_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """defaults < preset < init_model < JSON config file < overrides (flat names).

    ``init_model`` is the "model" section of a run to start from (``--init-from``):
    its architecture replaces the preset's.
    """
    config: dict[str, Any] = default_config()
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise VitMqaError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    _merge(config, PRESETS[preset], f"preset {preset}")
    if init_model is not None:
        shape = {k: v for k, v in init_model.items() if k not in DERIVED_MODEL_FIELDS}
        _merge(config, {"model": shape}, "`init_from` config.json")
    if config_file is not None:
        path = Path(config_file)
        try:
            layer = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VitMqaError(f"cannot read config file {path}: "
                              f"{str(e).splitlines()[0]}") from None
        if not isinstance(layer, dict):
            raise VitMqaError(f"config file {path} must hold a JSON object")
        _merge(config, layer, str(path))
    for name, value in (overrides or {}).items():
        section = field_section(name)
        config[section][name] = checked_value(section, name, value, "override")
    config["preset"] = preset
    return config


def resume_config(saved: dict[str, Any], overrides: dict[str, dict[str, Any]],
                  where: str | Path) -> dict[str, Any]:
    """A run's saved config with the few settings a resume may change replaced."""
    missing = [k for k in SECTIONS if not isinstance(saved.get(k), dict)]
    if missing:
        raise VitMqaError(f"cannot resume {where}: its config.json has no "
                          f"{', '.join(missing)} section (not a training run)")
    config = {k: copy.deepcopy(saved[k]) for k in (*SECTIONS, "preset") if k in saved}
    for section, values in overrides.items():
        for key, value in values.items():
            if (section, key) not in RESUME_OVERRIDABLE:
                allowed = ", ".join(f"`{k}`" for _, k in RESUME_OVERRIDABLE)
                raise VitMqaError(f"`{key}` cannot change on `resume` (the run keeps its "
                                  f"settings; allowed: {allowed})")
            config[section][key] = checked_value(section, key, value, "resume")
    return config


def data_config_from_dict(d: Any, where: str | Path) -> DataConfig:
    """A run's "data" section, checked."""
    try:
        return dataclass_from_dict(DataConfig, d, '"data"')
    except VitMqaError as e:
        raise VitMqaError(f"{where}: {e}") from None
