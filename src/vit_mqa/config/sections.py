"""Every setting of a run, as data: the four config sections.

A run is described by a plain nested dict with the sections "model", "data", "augment"
and "train" (plus the preset's name), as saved in its ``config.json``; each section is a
dataclass below that checks itself when made (:mod:`vit_mqa.config.checks`), and
:mod:`vit_mqa.config.recipe` layers presets, JSON files and flags into one. A setting's
documentation is the string under it: ``vit-mqa train --help`` shows it. This module
imports no torch, so that the command line answers ``--help`` at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .checks import (
    check_augment,
    check_data,
    check_model,
    check_train,
    dataclass_from_dict,
    image_pair,
)


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
    stem_convs: int = 1
    """"cct" only: 3x3 convolutions (each with a ReLU) before each max-pooling. CCT's
    tokenizer has 1; 2 makes it VGG-like (Simonyan & Zisserman 2015): each stage sees a
    5x5 neighbourhood before it is pooled."""
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
    classes: list[str] | None = None
    """Names of the outputs, in order (unset: "0", "1", ...); set from the data in
    training, and kept by every copy of the model."""
    preprocess: dict[str, Any] | None = None
    """How pictures become this model's input: "mean" and "std" per channel, "resize" and
    "procedure" (unset: pixels scaled to [-1, 1], stretched); set from the data in
    training, and kept by every copy of the model."""

    def __post_init__(self) -> None:
        self.image_size = image_pair(self.image_size)
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
        check_model(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # copies the lists and the preprocess dict
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
            patch = sum(9 * a * b + (self.stem_convs - 1) * 9 * b * b
                        for a, b in zip(widths, widths[1:]))
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
    printed: float = 0.0
    """MNIST only: printed digits (0-9 in the 38 DejaVu and Liberation fonts, rendered
    into MNIST's format and shipped with vit-mqa) added to the training images, as a
    share of their number (0.05: 2,750 more, each render repeated); validation and test
    stay MNIST's."""
    outliers: str = ""
    """Pictures of none of the classes, so that the model learns to answer "none of
    these" (outlier exposure, Hendrycks et al. 2019): "generated" (letters and symbols
    from the training fonts, scribbles, shapes, textures, pairs of digits; for 28x28 grey
    data; a model of other classes gets single digits too), a folder of pictures
    (searched recursively, read as prediction reads pictures), or both separated by a
    comma; "" = off."""
    num_outliers: int = 12000
    """How many pictures "generated" makes (a tenth is kept back to check the threshold)."""

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
        check_data(self)


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
    slant: float = 0.0
    """Largest slant in degrees, uniform in [-slant, slant]: a horizontal shear of the
    digit in its own frame, before rotation (handwriting leans)."""
    aspect: float = 1.0
    """Largest change of width, log-uniform in [1/aspect, aspect] (narrow and wide
    writing); 1 = off."""
    elastic: float = 0.0
    """Largest strength (px) of an elastic distortion (Simard et al. 2003): a smooth random
    displacement field (cells of 7 px at 28 px), times a strength drawn per image in
    [0, elastic]; at 3 it moves pixels about as far as Simard et al.'s 34; 0 = off."""
    stroke: float = 0.0
    """Largest change of stroke width in pixels, uniform in [-stroke, stroke] per image
    (a fine pen, a marker); 0 = off."""
    lowres: float = 0.0
    """Probability of a low-resolution round trip: the digit's 20 px box down to 7-16 px,
    17 grey levels, and back up (a digit scanned small, then enlarged)."""
    blur: float = 0.0
    """Largest Gaussian blur sigma in pixels, uniform in [0, blur] per image, contrast
    restored as prediction's procedure would; 0 = off."""
    contrast: float = 0.0
    """Probability of faint, grey and noisy ink: a gamma in [0.5, 2], the brightest level
    0.5-1, pixel noise up to 0.08."""
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
        check_augment(self)

    @property
    def reshapes(self) -> bool:
        """Whether the geometric stage changes a digit's shape (slant, width)."""
        return self.slant > 0 or self.aspect > 1

    @property
    def affine(self) -> bool:
        """Whether the geometric stage (one resampling of each image) is on."""
        return (self.rotate > 0 or self.translate > 0 or self.scale_min != 1
                or self.scale_max != 1 or self.reshapes or self.elastic > 0)

    @property
    def enabled(self) -> bool:
        return (self.affine or self.hflip > 0 or self.erase > 0 or self.stroke > 0
                or self.lowres > 0 or self.blur > 0 or self.contrast > 0)

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
    cpu_speedups: bool = True
    """On a CPU that multiplies bf16 in hardware, switch on bf16 (AVX512-BF16, AMX) and,
    with Intel AMX, compile too, where each measured faster; never where bf16 is emulated
    (AVX2). The run's config.json records what was used."""
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
    teacher: str = ""
    """Knowledge distillation (Hinton et al. 2015; DeiT, Touvron et al. 2021): a trained
    model (a run directory, a model folder or a built-in name; several, separated by
    commas, are averaged) whose predictions on each augmented batch the model also learns
    from; "" = off. It must take the same images and name the same classes."""
    distill: str = "soft"
    """What the teacher gives: "soft" its probabilities at distill_temperature, "hard" its
    top class (DeiT's hard distillation)."""
    distill_weight: float = 0.5
    """Share of the loss that comes from the teacher; the rest is the usual loss on the
    labels."""
    distill_temperature: float = 2.0
    """Temperature of both sides' softmax in soft distillation (the loss is scaled by its
    square, so that its gradients keep their size)."""
    tensorboard: bool = False
    """Also log scalars to RUN/tensorboard/ (needs tensorboard)."""
    freeze_backbone: bool = False
    """Train only the classification head (a linear probe)."""
    layer_decay: float = 1.0
    """Below 1, each block's learning rate is lr * layer_decay ** (blocks above it + 1);
    the head keeps lr (Clark et al. 2020; BEiT)."""
    outlier_weight: float = 0.5
    """Weight of the loss on the `outliers` (cross-entropy toward a uniform prediction)
    beside the loss on the classes."""
    outlier_batch: float = 0.5
    """Outlier pictures in each step, as a share of the batch."""
    decline_unknown: float = 0.01
    """Share of the validation images (as stored and augmented) that the fitted "none of
    these" threshold may decline; fitted only when the run trains with `outliers`."""
    decline_unsure: float = 0.02
    """Share of the validation images (as stored and augmented) under the fitted "unsure"
    threshold of the calibrated top probability; 0 keeps the fixed 50 %."""
    init_normalization: str = "source"
    """With --init-from: "source" normalises inputs with the pretrained model's mean and
    std, "data" recomputes them from this data."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_train(self)


SECTIONS: dict[str, type] = {
    "model": ViTConfig,
    "data": DataConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
}
# Settings a resumed run may change: where data lives, where and how fast it runs,
# how long.
